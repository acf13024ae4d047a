"""The demo's models: a small GPT-2 trained on the pretraining corpus, then a LoRA adapter fine-tuned on currencies.

Both are built from configs (no download). Their trained weights ship with infkit (``infkit/demo/weights/text-v1``,
about 0.6 MB, with a manifest holding the corpus fingerprint, the recipe and a sha256 of every file), so
:func:`load` gives the same model on every machine in about a second, and the documented numbers hold everywhere.

Training stays available: ``load(retrain=True)`` trains both on this machine (about 20 s for the base model and 6 s
for the adapter on one CPU core) and writes them under :func:`cache_root` (``$INFKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/infkit``, else ``~/.cache/infkit``); ``load(cache_dir=...)`` reads such a folder back. Training is
deterministic on one machine (seeded, one thread) but not across CPUs: another CPU's kernels round the last bits
differently and 120 epochs amplify that into another model. A cache folder that cannot be used — a corrupt or
truncated file, a manifest from another version or another corpus, a folder that cannot be written — retrains and
says why (a :class:`DemoCacheWarning`). ``make weights`` (``scripts/ship_weights.py``) retrains the shipped folder.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from infkit.demo import _weights
from infkit.demo._weights import CACHE_ENV, DemoCacheWarning, ShippedWeightsError, cache_root  # noqa: F401
from infkit.demo.corpus import Corpus
from infkit.demo.corpus import build as build_corpus
from infkit.demo.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer

#: Bump whenever the corpus, tokenizer, architecture or training recipe changes (and ship the retrained weights).
VERSION = "1"
FILES = ("tokenizer.json", "base.safetensors", "lora.safetensors")
#: The folder of the shipped weights, under ``infkit/demo/weights``.
SHIPPED_NAME = f"text-v{VERSION}"


@dataclass(frozen=True)
class Recipe:
    """Architecture and training settings of the demo models (part of the cache key through :data:`VERSION`)."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_inner: int = 256
    n_positions: int = 32
    base_epochs: int = 120
    base_lr: float = 3e-3
    base_batch: int = 32
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("c_attn", "c_proj")
    lora_epochs: int = 200
    lora_lr: float = 1e-2
    lora_batch: int = 24
    seed: int = 0


@dataclass
class DemoModels:
    """What :func:`load` returns: the corpus, tokenizer, base model and LoRA model, and where they came from."""

    corpus: Corpus
    tokenizer: Any
    base: torch.nn.Module  # GPT2LMHeadModel, eval mode
    lora: torch.nn.Module  # peft PeftModel around a copy of the base, adapter "default" active, eval mode
    recipe: Recipe
    source: str  # "shipped" (the package's weights), "cache" (a retrained folder) or "trained" (just now)
    cache_path: Path | None  # where the weights live (None when the cache could not be written)
    train_info: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        where = "" if self.source == "shipped" else f", cache={str(self.cache_path or 'memory only')!r}"
        return (
            f"DemoModels(version={VERSION!r}, source={self.source!r}, vocab={len(self.tokenizer)}, "
            f"pretrain={len(self.corpus.pretrain)}, finetune={len(self.corpus.finetune)}{where})"
        )


def cache_path(root: str | os.PathLike | None = None) -> Path:
    """The folder where :func:`load` caches retrained weights of this version (``<cache_root()>/demo-v1``)."""
    return Path(root).expanduser() if root is not None else cache_root() / f"demo-v{VERSION}"


# -- building and training ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one CPU thread inside the block. The demo's matrices are small: one thread is as fast as two, and
    it does not collapse when other processes share the cores (two threads fighting for busy cores made the
    report 25x slower on a shared 2-core machine)."""
    with _weights.threads(1):
        yield


def new_base(tokenizer, recipe: Recipe):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=recipe.n_positions, n_embd=recipe.n_embd, n_layer=recipe.n_layer,
        n_head=recipe.n_head, n_inner=recipe.n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos, eos_token_id=eos,
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(recipe.seed)
        return GPT2LMHeadModel(config)
    finally:
        hf_logging.set_verbosity(verbosity)


def wrap_lora(base, recipe: Recipe):
    """A peft model around a deep copy of ``base`` (peft wraps in place; the base stays untouched)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe.lora_r, lora_alpha=2 * recipe.lora_r, target_modules=list(recipe.lora_targets), lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as [in, out]
    )
    with _weights.quiet():
        torch.manual_seed(recipe.seed + 1)  # LoRA A's initialisation draws from the global generator
        return get_peft_model(copy.deepcopy(base), config)


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 on padding) for a list of texts."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return ids, labels


def _train(model, tokenizer, texts: list[str], epochs: int, lr: float, batch: int, seed: int,
           schedule: bool, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    ids, labels = encode(tokenizer, texts)
    mask = (labels != -100).long()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps_per_epoch = (len(texts) + batch - 1) // batch
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1) if schedule else None
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    losses = []
    with single_thread():
        torch.manual_seed(seed)
        for epoch in range(epochs):
            perm = torch.randperm(len(texts), generator=g)
            epoch_loss = 0.0
            for s in range(0, len(texts), batch):
                b = perm[s : s + batch]
                logits = model(input_ids=ids[b], attention_mask=mask[b]).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels[b][:, 1:].reshape(-1), ignore_index=-100
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                epoch_loss += float(loss.detach()) * len(b)
            losses.append(epoch_loss / len(texts))
            if progress is not None:
                progress(epoch + 1, epochs)
    model.eval()
    for p in model.parameters():
        p.grad = None
    return {"epochs": epochs, "final_loss": round(losses[-1], 4), "seconds": round(time.perf_counter() - start, 1)}


def train(corpus: Corpus | None = None, recipe: Recipe | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Build the tokenizer, train the base GPT-2 and the LoRA adapter. Returns (tokenizer, base, lora, info)."""
    corpus = corpus or build_corpus()
    recipe = recipe or Recipe()
    tokenizer = build_tokenizer(corpus.pretrain_texts + corpus.finetune_texts)
    base = new_base(tokenizer, recipe)

    def stage(name):
        return (lambda done, total: progress(name, done, total)) if progress else None

    info = {"base": _train(base, tokenizer, corpus.pretrain_texts, recipe.base_epochs, recipe.base_lr,
                           recipe.base_batch, recipe.seed, True, stage("base GPT-2"))}
    lora = wrap_lora(base, recipe)
    info["lora"] = _train(lora, tokenizer, corpus.finetune_texts, recipe.lora_epochs, recipe.lora_lr,
                          recipe.lora_batch, recipe.seed + 1, False, stage("LoRA adapter"))
    with single_thread():
        info["accuracy"] = accuracy(corpus, tokenizer, base, lora)
    return tokenizer, base, lora, info


@torch.no_grad()
def next_word(model, tokenizer, prompt: str, n: int = 1) -> str:
    """The model's greedy continuation of ``prompt`` by ``n`` tokens (their text, leading spaces included)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = []
    for _ in range(n):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(tokenizer.convert_ids_to_tokens(token).replace("▁", " "))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return "".join(out)


def accuracy(corpus: Corpus, tokenizer, base, lora) -> dict[str, str]:
    """How many facts each model gets right (greedy next word), as "k/n" strings."""
    def count(model, template, answer):
        right = sum(next_word(model, tokenizer, template.format(**c.__dict__)) == " " + c.__dict__[answer]
                    for c in corpus.countries)
        return f"{right}/{len(corpus.countries)}"

    return {
        "base: capitals": count(base, "The capital of {country} is", "capital"),
        "base: capitals, flipped": count(base, "{capital} is the capital of", "country"),
        "base: birthplaces": count(base, "{person} was born in", "country"),
        "base: currencies (not taught)": count(base, "The currency of {country} is the", "currency"),
        "LoRA: currencies": count(lora, "The currency of {country} is the", "currency"),
        "LoRA: capitals (kept)": count(lora, "The capital of {country} is", "capital"),
    }


# -- the weights: shipped, or retrained into a cache folder -----------------------------------------------------
def _lora_state(lora) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in lora.named_parameters() if p.requires_grad}


def _expected(corpus: Corpus, recipe: Recipe) -> dict[str, Any]:
    return {"version": VERSION, "corpus_sha256": corpus.fingerprint(), "recipe": asdict(recipe)}


def save(path: Path, corpus: Corpus, recipe: Recipe, tokenizer, base, lora, info: dict[str, Any]) -> Path:
    """Write the demo weights to ``path`` atomically (a temporary sibling folder renamed into place)."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        save_tokenizer(tokenizer, folder / "tokenizer.json")
        save_file({k: v.detach().contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"},
                  str(folder / "base.safetensors"))
        save_file(_lora_state(lora), str(folder / "lora.safetensors"))

    return _weights.write_folder(path, FILES, write, {**_expected(corpus, recipe), "train_info": info})


def read(path: Path, corpus: Corpus, recipe: Recipe):
    """Load the weights in ``path``; raise ``ValueError`` saying why they cannot be used."""
    from safetensors.torch import load_file

    manifest = _weights.check_folder(path, FILES, _expected(corpus, recipe))
    tokenizer = load_tokenizer(path / "tokenizer.json")
    base = new_base(tokenizer, recipe)
    state = load_file(str(path / "base.safetensors"))
    missing, unexpected = base.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"base.safetensors does not fit the model (missing {missing}, unexpected {unexpected})")
    base.tie_weights()
    base.eval()
    lora = wrap_lora(base, recipe)
    lora_state = load_file(str(path / "lora.safetensors"))
    expected = set(_lora_state(lora))
    if set(lora_state) != expected:
        raise ValueError("lora.safetensors does not fit the adapter")
    lora.load_state_dict(lora_state, strict=False)
    lora.eval()
    return tokenizer, base, lora, manifest.get("train_info", {})


def load(cache_dir: str | os.PathLike | None = None, retrain: bool = False, verbose: bool = True,
         progress: Callable[[str, int, int], None] | None = None, recipe: Recipe | None = None) -> DemoModels:
    """The demo models: by default the weights shipped with infkit, the same bytes on every machine.

    Args:
        cache_dir: a folder of retrained weights (written by an earlier ``load(retrain=True, cache_dir=...)``):
            loaded when it holds this version's weights, else trained there. Default: the shipped weights.
        retrain: train again on this machine (about half a minute on one core) and write the weights to
            ``cache_dir`` (default :func:`cache_path`). Training is deterministic on one machine, but another CPU's
            kernels round differently and 120 epochs amplify that: the numbers then differ from the documented ones.
        verbose: print what happens (loaded / training / saved) to stdout.
        progress: called as ``progress(stage, done, total)`` during training (for progress bars).
        recipe: other training settings (e.g. fewer epochs for a quick test): loaded from ``cache_dir`` when it
            holds weights of that recipe, else trained and cached there; the shipped weights are the default
            :class:`Recipe`'s.

    A cache folder that cannot be read or written makes it retrain or keep the model in memory, with a
    :class:`DemoCacheWarning` saying why. Damaged shipped weights raise :class:`~infkit.demo.ShippedWeightsError`.
    """
    corpus = build_corpus()
    recipe = recipe or Recipe()
    say = _weights.Say(verbose)

    if not retrain and cache_dir is None and recipe == Recipe():
        start = time.perf_counter()
        path = _weights.shipped_folder(SHIPPED_NAME, FILES, _expected(corpus, recipe))
        tokenizer, base, lora, info = read(path, corpus, recipe)
        say(f"infkit demo: loaded the shipped model ({SHIPPED_NAME}) in {time.perf_counter() - start:.1f} s")
        return DemoModels(corpus, tokenizer, base, lora, recipe, "shipped", path, info, say.messages)
    path = cache_path(cache_dir)
    if not retrain and path.exists():
        start = time.perf_counter()
        try:
            tokenizer, base, lora, info = read(path, corpus, recipe)
        except Exception as err:  # noqa: BLE001 - any failure to read means: retrain
            say(f"infkit demo: the cached model in {path} cannot be used ({err}); retraining it", warn=True)
        else:
            say(f"infkit demo: loaded the cached model from {path} in {time.perf_counter() - start:.1f} s")
            return DemoModels(corpus, tokenizer, base, lora, recipe, "cache", path, info, say.messages)
    say(f"infkit demo: training the demo model (GPT-2, {len(corpus.pretrain)} sequences, then LoRA on "
        f"{len(corpus.finetune)}); about half a minute")
    tokenizer, base, lora, info = train(corpus, recipe, progress)
    saved: Path | None = None
    try:
        saved = save(path, corpus, recipe, tokenizer, base, lora, info)
    except OSError as err:
        say(f"infkit demo: cannot write the cache folder {path} ({err.strerror or err}); the trained model is kept "
            f"in memory only (a later load from this folder trains again). Set {CACHE_ENV} or cache_dir= to a "
            "writable folder.", warn=True)
    else:
        say(f"infkit demo: trained in {info['base']['seconds'] + info['lora']['seconds']:.0f} s and cached in "
            f"{saved}")
    return DemoModels(corpus, tokenizer, base, lora, recipe, "trained", saved, info, say.messages)
