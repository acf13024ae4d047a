"""Fingerprints: what a fit depends on (the model, the train data, the task), hashed, so that a cache or a save
is never used with another model or data. :func:`describe_mismatch` says, in words, what differs.

* **model** — every parameter and buffer of the whole model, not only the tracked layers: an untracked embedding,
  a LayerNorm, BatchNorm running statistics or a LoRA adapter's base weights all change the tracked layers'
  inputs or gradients. One sha256 over all of them plus a short digest per tensor (so a mismatch can name the
  tensors that differ), and the tracked layers' shapes.
* **data** — the train data's size and a sha256 of its collated tensors (what the model actually sees).
* **task** — the task's type, its plain settings and a digest of its tensor-valued ones (e.g. class weights).

:class:`Staleness` repeats the model and data checks cheaply on every query after ``fit()`` (weights edited in
place, a train list appended to or edited).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from infkit.capture import Layer
from infkit.errors import InfkitError
from infkit.tasks.base import ExampleError

#: A per-tensor digest's length in hex characters (64 bits: enough to name which tensors differ).
TENSOR_DIGEST_CHARS = 16
#: Up to this many bytes of model state, every query re-hashes the whole model (sha256 runs at ~1 GB/s: ~30 ms at
#: most); above it a query re-hashes only when PyTorch's version counters or storages say a tensor was written.
FULL_CHECK_BYTES = 32 << 20
#: The most examples whose shallow token a query compares (above it, an evenly strided sample of them).
TOKEN_EXAMPLES = 65536


def fingerprint(analysis) -> dict[str, Any]:
    """What a fit depends on: the whole model's state, the train data and the task's settings."""
    world = getattr(analysis, "world", None)
    if world is not None and world.active:  # several processes: each rank hashes its own shard, none reads it all
        own = data_fingerprint(analysis.task, analysis.train_data, indices=analysis.shard)["data_sha256"]
        digests = world.gather_objects(own, "fingerprint the train data")
        data = {"n_train": len(analysis.train_data), "shards": world.size, "shard_sha256": digests,
                "data_sha256": hashlib.sha256("".join(digests).encode()).hexdigest()}
    else:
        data = data_fingerprint(analysis.task, analysis.train_data)
    found = {
        "model": model_fingerprint(analysis.model, analysis.layers),
        "data": data,
        "task": task_fingerprint(analysis.task),
    }
    fit_data = getattr(analysis, "fit_data", None)
    if fit_data is not None:  # what the curvature was fitted on (a load does not need it again)
        found["fit_data"] = data_fingerprint(analysis.task, fit_data)
    return found


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy: sha256 reads the storage


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name; a tensor shared by two modules counts once."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    return state


def model_fingerprint(model: torch.nn.Module, layers: dict[str, Layer]) -> dict[str, Any]:
    """The tracked layers' shapes, one sha256 over the model's whole state, and a short digest per tensor."""
    whole = hashlib.sha256()
    digests = {}
    for name, t in model_state(model).items():
        h = hashlib.sha256()
        _hash_tensor(h, t)
        digests[name] = h.hexdigest()[:TENSOR_DIGEST_CHARS]
        whole.update(name.encode() + h.digest())
    shapes = {name: [layer.d_out, layer.d_in] for name, layer in layers.items()}
    return {"layers": shapes, "state_sha256": whole.hexdigest(), "tensors": digests}


def data_fingerprint(task, data, batch_size: int = 64, indices: range | None = None) -> dict[str, Any]:
    """Train data size and a sha256 of its collated tensors (what the model actually sees); ``indices``: of those
    examples only (a rank's shard)."""
    h = hashlib.sha256()
    n = len(data)
    indices = indices if indices is not None else range(n)
    for start in range(0, len(indices), batch_size):
        chosen = indices[start : start + batch_size]
        try:
            batch = task.collate([data[i] for i in chosen])
        except ExampleError as err:  # the task knows the batch position; say the example's index in the data
            raise InfkitError(f"train example {chosen[err.position]} {err.problem}") from err
        for key in sorted(batch):
            if torch.is_tensor(batch[key]):
                h.update(key.encode())
                _hash_tensor(h, batch[key])
    return {"n_train": n, "data_sha256": h.hexdigest()}


def task_fingerprint(task) -> dict[str, Any]:
    """The task's type and its settings that change the losses without changing the collated data: plain ones
    (numbers, strings, flags: e.g. ``max_length``, a diffusion task's ``n_draws`` and ``seed``) by value, tensor
    ones (e.g. class weights) by a short digest."""
    settings = {}
    for name, value in sorted(vars(task).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, (bool, int, float, str)):  # None = a default: left out
            settings[name] = value
        elif torch.is_tensor(value):
            h = hashlib.sha256()
            _hash_tensor(h, value)
            settings[name] = f"tensor {tuple(value.shape)} sha256:{h.hexdigest()[:TENSOR_DIGEST_CHARS]}"
    return {"type": type(task).__name__, "settings": settings}


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    problems = _layer_problems(saved["model"]["layers"], current["model"]["layers"])
    if not problems:
        problems += _state_problems(saved["model"], current["model"])
    if saved["data"]["n_train"] != current["data"]["n_train"]:
        n_now, n_saved = current["data"]["n_train"], saved["data"]["n_train"]
        problems.append(f"the train data has {n_now} examples, {n_saved} when saved")
    elif saved["data"]["data_sha256"] != current["data"]["data_sha256"]:
        problems.append("the train data has the same size but other contents (or another order or tokenizer)")
    if "task" in saved and "task" in current and saved["task"] != current["task"]:  # older saves lack it
        problems.append(f"the task is {_task_text(current['task'])} here, {_task_text(saved['task'])} when saved")
    return problems


def _layer_problems(saved_layers: dict[str, Any], current_layers: dict[str, Any]) -> list[str]:
    problems = []
    missing = sorted(set(saved_layers) - set(current_layers))
    extra = sorted(set(current_layers) - set(saved_layers))
    if missing:
        problems.append(f"tracked layers in the saved analysis but not in this model: {missing[:5]}")
    if extra:
        problems.append(f"tracked layers in this model but not in the saved analysis: {extra[:5]}")
    for name in sorted(set(saved_layers) & set(current_layers)):
        if list(saved_layers[name]) != list(current_layers[name]):
            problems.append(f"layer {name!r} has shape {current_layers[name]} here, {saved_layers[name]} when saved")
    return problems


def _state_problems(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    if "state_sha256" not in saved:
        return ["the save's fingerprint covers only the tracked layers (an older infkit), so it cannot tell whether "
                "the rest of the model is the same: fit the analysis again and save it"]
    if saved["state_sha256"] == current["state_sha256"]:
        return []
    before, now = saved["tensors"], current["tensors"]
    changed = [name for name in now if name in before and before[name] != now[name]]
    added = [name for name in now if name not in before]
    removed = [name for name in before if name not in now]
    parts = []
    for what, names in (("other values", changed), ("new here", added), ("missing here", removed)):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            parts.append(f"{what}: {', '.join(names[:5])}{more}")
    return ["the model's weights or buffers differ from the ones fitted (trained further, edited, another base "
            f"model or adapter?) — {'; '.join(parts)}"]


def _task_text(task_fp: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v!r}" for k, v in task_fp["settings"].items())
    return f"{task_fp['type']}({settings})"


class Staleness:
    """Whether the model or the train data changed since a fit, checked cheaply before each query.

    The model: PyTorch bumps a tensor's version counter on every in-place write through autograd-visible ops
    (optimizer steps, ``load_state_dict``, ``with torch.no_grad(): w.mul_(2)``) and a reassigned parameter has
    another storage; when either changed, or when the model is small enough, the whole state is hashed again and
    compared with the fit's fingerprint. (Writes through ``.data`` bypass the counters; on models above
    ``FULL_CHECK_BYTES`` they are caught by the next save or load, not by a query.)

    The train data: its length, and a shallow token of its examples — which objects a list holds and, one level
    down, which values an example (dict or tuple) holds and its tensors' version counters (a ``datasets.Dataset``:
    its own fingerprint). When the token moved, the collated data is hashed again and compared. Above
    ``TOKEN_EXAMPLES`` examples the token covers an evenly strided sample of them. (An edit deeper than one level,
    e.g. a Python list of token ids changed in place, is caught by the next save or load.)"""

    def __init__(self, analysis, fitted: dict[str, Any]):
        self.fitted = fitted
        self.model_token = self._model_token(analysis.model)
        self.data_token = self._data_token(analysis.train_data)

    @staticmethod
    def _model_token(model: torch.nn.Module) -> list[tuple]:
        return [(name, t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                for name, t in model_state(model).items()]

    @staticmethod
    def _data_token(data: Any) -> Any:
        if hasattr(data, "_fingerprint"):  # a datasets.Dataset: a new fingerprint after every transform
            return data._fingerprint
        if not isinstance(data, (list, tuple)):
            return None
        step = max(1, len(data) // TOKEN_EXAMPLES)
        return [_example_token(data[i]) for i in range(0, len(data), step)]

    def problems(self, analysis) -> list[str]:
        """What changed since the fit, in words (empty when nothing did)."""
        state = model_state(analysis.model)
        small = sum(t.numel() * t.element_size() for t in state.values()) <= FULL_CHECK_BYTES
        token = self._model_token(analysis.model)
        found = []
        if small or token != self.model_token:
            found += _state_problems(self.fitted["model"], model_fingerprint(analysis.model, analysis.layers))
            if not found:
                self.model_token = token  # written to, but back to the fitted values: nothing to refuse
        n_now, n_fit = len(analysis.train_data), self.fitted["data"]["n_train"]
        if n_now != n_fit:
            found.append(f"the train data has {n_now} examples now, {n_fit} when fitted")
        else:
            token = self._data_token(analysis.train_data)
            if token != self.data_token:
                fitted = self.fitted["data"]
                if "shards" in fitted:  # several processes: this rank checks its own shard (no collective here)
                    now = data_fingerprint(analysis.task, analysis.train_data, indices=analysis.shard)["data_sha256"]
                    then = fitted["shard_sha256"][analysis.world.rank]
                else:
                    now = data_fingerprint(analysis.task, analysis.train_data)["data_sha256"]
                    then = fitted["data_sha256"]
                if now != then:
                    found.append("the train data has the same size but other contents (examples edited or reordered)")
                else:
                    self.data_token = token
        return found


def _example_token(example: Any) -> tuple:
    """Which object an example is and, one level down, which values it holds (tensors with their version)."""
    if isinstance(example, dict):
        values = list(example.items())
    elif isinstance(example, (list, tuple)):
        values = list(enumerate(example))
    else:
        return (id(example),)
    parts = [(key, id(value), value._version if torch.is_tensor(value) else None) for key, value in values]
    return (id(example), *parts)
