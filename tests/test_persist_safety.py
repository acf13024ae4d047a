"""Saving is safe for the user's files and for the previous save: infkit replaces only a folder it wrote, a killed
save is recovered, saves to one path take turns (a lock file), what killed saves leave is cleaned, and a load
refuses a save whose tensors do not fit its metadata (or another model) with a message naming the problem."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from infkit import Analysis, InfkitError, persist, savefolder, tasks

REPO = Path(__file__).resolve().parent.parent
N_TRAIN = 40


def tiny():
    """A 5-7-3 tanh MLP (layers "0": 7 x 6 and "2": 3 x 8 with their bias columns) and 40 examples, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(N_TRAIN, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN,))
    return model, list(zip(x, y))


MODEL, TRAIN = tiny()


def make(estimator="ekfac", **kwargs):
    kwargs.setdefault("damping", 1e-3)
    return Analysis(MODEL, tasks.Classification(), TRAIN, estimator=estimator, progress=False, batch_size=16,
                    **kwargs)


def load(path):
    return Analysis.load(path, MODEL, tasks.Classification(), TRAIN, progress=False)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- 5: only infkit's own folders are replaced ------------------------------------------------------------------------
def test_a_users_folder_with_an_analysis_json_is_refused_and_left_intact(tmp_path):
    user = tmp_path / "thesis"
    (user / "figures").mkdir(parents=True)
    (user / "analysis.json").write_text('{"chapter": 3, "notes": "my own analysis"}')
    (user / "thesis.txt").write_text("four years of work")
    (user / "figures" / "fig1.png").write_bytes(b"\x89PNG not really")
    before = {p.relative_to(user): p.read_bytes() for p in user.rglob("*") if p.is_file()}
    an = make().fit()
    with pytest.raises(InfkitError, match=r"thesis is not an infkit save \(it holds files infkit does not write: "
                                          r"figures, thesis.txt\).*choose another path"):
        an.save(user)
    assert {p.relative_to(user): p.read_bytes() for p in user.rglob("*") if p.is_file()} == before
    assert names(tmp_path) == ["thesis"]  # nothing left beside it either
    # a lone analysis.json that infkit did not write (no valid self-checksum) is refused as well
    (user / "thesis.txt").unlink()
    shutil.rmtree(user / "figures")
    with pytest.raises(InfkitError, match=r"its analysis.json is not one infkit wrote"):
        an.save(user)
    assert json.loads((user / "analysis.json").read_text()) == {"chapter": 3, "notes": "my own analysis"}


def test_an_infkit_save_with_a_users_file_added_is_refused_but_an_empty_folder_is_used(tmp_path):
    an = make().fit()
    an.save(tmp_path / "saved")
    (tmp_path / "saved" / "notes.md").write_text("what I found")
    with pytest.raises(InfkitError, match="it holds files infkit does not write: notes.md"):
        an.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "notes.md").read_text() == "what I found"
    (tmp_path / "empty").mkdir()
    an.save(tmp_path / "empty")  # nothing in it to lose
    assert names(tmp_path / "empty") == [persist.META, persist.TENSORS]
    load(tmp_path / "empty")


# -- 6: kills, locks, leftovers, concurrency ----------------------------------------------------------------------
KILLED_SAVE = """
import os, sys, torch
from infkit import Analysis, tasks
model, train = torch.load(sys.argv[1], weights_only=False)
an = Analysis(model, tasks.Classification(), train, damping=1e-1, progress=False, batch_size=16).fit()
real, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the new save is complete, the old one renamed away: killed here
        os._exit(3)
    real(src, dst)
os.replace = replace
an.save(sys.argv[2])
"""


def kill_between_renames(tmp_path: Path, target: Path) -> None:
    inputs = tmp_path / "inputs.pt"
    torch.save((MODEL, TRAIN), inputs)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(inputs), str(target)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    inputs.unlink()


def test_a_save_killed_between_its_renames_is_recovered_by_the_next_load_and_the_next_save(tmp_path, monkeypatch):
    first = make().fit()
    first.save(tmp_path / "a" / "saved")
    kill_between_renames(tmp_path, tmp_path / "a" / "saved")
    assert "saved" not in names(tmp_path / "a")  # the state a kill there leaves: the old save is hidden away
    assert any(name.startswith(".saved.old-") for name in names(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    loaded = load(tmp_path / "a" / "saved")  # the next load puts the previous save back
    assert loaded.estimator.damping_used == first.estimator.damping_used
    assert not any(name.startswith((".saved.old-", ".saved.lock")) for name in names(tmp_path / "a"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(persist, "save_file", crash)  # the next save recovers it before writing (and failing)
    with pytest.raises(KeyboardInterrupt):
        make(damping=1e-2).fit().save(tmp_path / "b" / "saved")
    assert load(tmp_path / "b" / "saved").estimator.damping_used == first.estimator.damping_used
    monkeypatch.undo()
    third = make(damping=1e-2).fit()
    third.save(tmp_path / "b" / "saved")
    assert names(tmp_path / "b") == ["saved"]  # the killed save's partial folder is gone too
    assert load(tmp_path / "b" / "saved").estimator.damping_used == third.estimator.damping_used


def test_a_held_lock_gives_a_clear_error_and_leaves_the_save_as_it_was(tmp_path, monkeypatch):
    first = make().fit()
    first.save(tmp_path / "saved")
    lock = tmp_path / ".saved.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()} held-by-this-test\n")  # a live process holds it
    monkeypatch.setattr(savefolder, "LOCK_TIMEOUT", 0.3)
    with pytest.raises(InfkitError, match=rf"another save to .*saved is in progress \(pid {os.getpid()}, .*"
                                          r"wait until it has finished"):
        make(damping=1e-2).fit().save(tmp_path / "saved")
    assert names(tmp_path) == [".saved.lock", "saved"]  # no partial folder, and the lock is not taken from its holder
    assert lock.read_text().endswith("held-by-this-test\n")
    assert load(tmp_path / "saved").estimator.damping_used == first.estimator.damping_used

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{gone.pid} {socket.gethostname()} left-by-a-killed-save\n")  # its process has ended: stale
    make(damping=1e-2).fit().save(tmp_path / "saved")
    assert names(tmp_path) == ["saved"]


def test_what_killed_saves_left_is_cleaned_by_the_next_save_and_nothing_else(tmp_path):
    make().fit().save(tmp_path / "saved")
    partial = tmp_path / ".saved.partial-0123abcd"  # killed while writing
    partial.mkdir()
    (partial / persist.TENSORS).write_bytes(b"\0" * (1 << 20))
    old = tmp_path / ".saved.old-89abcdef"  # killed after the second rename, before deleting the old save
    shutil.copytree(tmp_path / "saved", old)
    (tmp_path / ".saved.partial-mine").mkdir()  # not a name infkit makes: left alone
    (tmp_path / "saved.partial-0123abcd").mkdir()
    make(damping=1e-2).fit().save(tmp_path / "saved")
    assert names(tmp_path) == [".saved.partial-mine", "saved", "saved.partial-0123abcd"]


def test_concurrent_saves_take_turns_and_concurrent_loads_get_a_whole_save(tmp_path):
    fitted = [make(seed=k, damping=10.0 ** -(k + 1)).fit() for k in range(4)]  # other labels, other eigenvalues
    by_damping = {an.estimator.damping_used["0"]: an for an in fitted}
    target = tmp_path / "saved"
    fitted[0].save(target)
    errors: list[str] = []
    start = threading.Barrier(len(fitted) + 1)
    saving = True

    def saves(an):
        try:
            start.wait()
            for _ in range(4):
                an.save(target)
        except BaseException:  # noqa: B036 - reported below
            errors.append(traceback.format_exc())

    def loads():
        try:
            start.wait()
            while saving:
                loaded = load(target)
                source = by_damping[loaded.estimator.damping_used["0"]]  # the metadata and the tensors of one save
                assert torch.equal(loaded.estimator.eigenvalues["0"], source.estimator.eigenvalues["0"])
        except BaseException:  # noqa: B036 - reported below
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=saves, args=(an,)) for an in fitted]
    reader = threading.Thread(target=loads)
    for t in [*threads, reader]:
        t.start()
    for t in threads:
        t.join()
    saving = False
    reader.join()
    assert not errors, "\n".join(errors)
    assert names(tmp_path) == ["saved"]
    assert load(target).estimator.damping_used["0"] in by_damping


# -- 7: a consistent-looking but inconsistent save is refused --------------------------------------------------------
def rewrite(folder: Path, change) -> None:
    """Rewrite the tensor file with ``change(tensors)`` applied, and both checksums as persist computes them."""
    tensors = load_file(str(folder / persist.TENSORS))
    change(tensors)
    save_file(tensors, str(folder / persist.TENSORS))
    meta = json.loads((folder / persist.META).read_text())
    meta["tensors_sha256"] = persist.sha256_file(folder / persist.TENSORS)
    meta["meta_sha256"] = persist._self_checksum(meta)
    (folder / persist.META).write_text(json.dumps(meta))


def drop_layer(tensors):
    for key in [k for k in tensors if k.startswith(("factors/0/", "train/0"))]:
        del tensors[key]


def set_item(key, value):
    def change(tensors):
        tensors[key] = value(tensors[key])
    return change


def poison(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize("change, message", [
    (drop_layer, r"tensor 'factors/0/eigvecs_a' is missing; tensor 'factors/0/eigvecs_s' is missing"),
    (set_item("factors/2/eigenvalues", lambda t: t[:, :7].contiguous()),
     r"tensor 'factors/2/eigenvalues' has shape \[3, 7\], expected \[3, 8\]"),
    (set_item("self_influence", lambda t: t[:3].contiguous()),
     r"tensor 'self_influence' has shape \[3\], expected \[40\] \(one value per train example, n_train = 40\)"),
    (set_item("train/2", lambda t: t[:39].contiguous()),
     r"tensor 'train/2' has shape \[39, 3, 8\], expected \[40, 3, 8\]"),
    (set_item("factors/0/eigenvalues", poison), r"tensor 'factors/0/eigenvalues' has values that are not finite"),
    (set_item("train/0", lambda t: t.to(torch.bfloat16)), r"tensor 'train/0' is torch.bfloat16, expected"),
])
def test_an_inconsistent_save_with_valid_checksums_is_refused_naming_the_tensor(tmp_path, change, message):
    an = make().fit()
    an.self_influence()
    an.save(tmp_path / "saved")
    rewrite(tmp_path / "saved", change)
    with pytest.raises(InfkitError, match=message + r".*fit the analysis and save it again"):
        load(tmp_path / "saved")


@pytest.mark.parametrize("estimator, options", [
    ("ekfac", {}), ("kfac", {}), ("exact", {}), ("exact", {"fisher": "empirical", "block_diagonal": True}),
    ("datainf", {}), ("datainf", {"fisher": "sampled", "fisher_samples": 2}), ("lissa", {"depth": 20}),
])
@pytest.mark.filterwarnings("ignore:datainf is designed for LoRA")
@pytest.mark.filterwarnings("ignore:lissa is designed for LoRA")
def test_every_estimators_save_loads_and_a_state_tensor_of_the_wrong_shape_is_refused(tmp_path, estimator, options):
    an = make(estimator, **options).fit()
    an.save(tmp_path / "saved")
    load(tmp_path / "saved")  # the shapes each estimator declares are the ones it saves
    state = {k: v for k, v in load_file(str(tmp_path / "saved" / persist.TENSORS)).items() if k.startswith("factors/")}
    key = next(k for k in sorted(state) if state[k].dim() > 0 and state[k].shape[0] > 1)
    rewrite(tmp_path / "saved", set_item(key, lambda t: t[1:].contiguous()))
    with pytest.raises(InfkitError, match=rf"tensor '{key}' has shape .*, expected .*fit the analysis and save"):
        load(tmp_path / "saved")


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


def test_loading_another_models_save_says_it_was_saved_for_another_model(tmp_path):
    make().fit().save(tmp_path / "saved")
    with pytest.raises(InfkitError, match=r"saved for another model: 2 of its 2 tracked layers are not in this "
                                          r"model \('0', '2'\)"):
        Analysis.load(tmp_path / "saved", Other().double(), tasks.Classification(), TRAIN, progress=False)
