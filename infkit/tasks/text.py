"""Text tasks: :class:`Classification` (cross-entropy, plain tensors or token dicts) and :class:`CausalLM`
(next-token prediction, prompt/completion queries). The protocol they follow is :mod:`infkit.tasks.base`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from infkit.errors import InfkitError
from infkit.tasks.base import IGNORE_INDEX, ExampleError, Task


def _sample_labels(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Draw one label per position from softmax(logits), example b from ``generators[b]`` (on the logits' device),
    so an example's labels do not depend on which batch it is in. The softmax stays on the device, in float32
    (float64 for a float64 model)."""
    probs = torch.softmax(_at_least_float32(logits.detach()), dim=-1)
    flat = probs.reshape(probs.shape[0], -1, probs.shape[-1])
    broken = ~torch.isfinite(flat).all(dim=-1, keepdim=True)
    # non-finite logits: draw anything; the loss is non-finite and is reported by example
    flat = torch.where(broken, torch.ones_like(flat), flat)
    drawn = torch.stack([torch.multinomial(flat[b], 1, generator=g)[:, 0] for b, g in enumerate(generators)])
    return drawn.reshape(probs.shape[:-1])


def _softmax_hessian_root(logits: torch.Tensor) -> torch.Tensor:
    """R with R Rᵀ = diag(p) − p pᵀ, the Hessian of cross-entropy w.r.t. logits: R = diag(√p) − p √pᵀ."""
    probs = torch.softmax(logits.detach(), dim=-1)
    root_p = probs.sqrt()
    return torch.diag_embed(root_p) - probs.unsqueeze(-1) * root_p.unsqueeze(-2)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses of half-precision models in float32; float64 models keep float64."""
    return x if x.dtype == torch.float64 else x.float()


def _logits_of(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise InfkitError(f"the model returned {type(output).__name__} with no logits; a task expects logits")
    return logits


@dataclass
class Classification(Task):
    """Cross-entropy classification. Examples: ``(x, y)`` tuples, or dicts of model inputs with ``labels``.

    Works for a plain ``nn.Module`` (called as ``model(x)``) and for transformers sequence classifiers
    (called as ``model(**inputs)``). The train loss of an example is its cross-entropy (one "token").
    Token dicts of different lengths (``input_ids`` and optionally ``attention_mask`` / ``token_type_ids``, 1-D)
    are right-padded with ``pad_token_id`` (else the tokenizer's, else 0) and given an attention mask.
    """

    tokenizer: Any = None
    pad_token_id: int | None = None

    def _pad_tokens(self, examples) -> dict[str, torch.Tensor]:
        """Right-pad variable-length token dicts: input_ids with the pad id, masks and type ids with 0."""
        rows = [{k: torch.as_tensor(v) for k, v in ex.items() if k != "labels"} for ex in examples]
        pad = _pad_id(self.pad_token_id, self.tokenizer)
        batch = {key: _right_pad([r[key] for r in rows], pad if key == "input_ids" else 0) for key in rows[0]}
        if "attention_mask" not in batch:
            batch["attention_mask"] = _right_pad([torch.ones_like(r["input_ids"]) for r in rows], 0)
        batch["labels"] = torch.as_tensor([int(ex["labels"]) for ex in examples], dtype=torch.long)
        return batch

    def collate(self, examples):
        if not examples:
            raise InfkitError("empty batch: the data has no examples")
        first = examples[0]
        if isinstance(first, Mapping):
            if "labels" not in first:
                raise InfkitError("Classification examples given as dicts need a 'labels' entry")
            ids = [torch.as_tensor(ex.get("input_ids", 0)) for ex in examples]
            if "input_ids" in first:
                for b, t in enumerate(ids):
                    _check_id_dtype(t, b)
            if all(t.dim() == 1 for t in ids) and len({t.shape[0] for t in ids}) > 1:
                return self._pad_tokens(examples)
            keys = list(first.keys())
            batch = {k: _stack([ex[k] for ex in examples], key=k) for k in keys}
            batch["labels"] = batch["labels"].long().reshape(-1)
            return batch
        if isinstance(first, (tuple, list)) and len(first) == 2:
            inputs = [torch.as_tensor(ex[0]) for ex in examples]
            for b, x in enumerate(inputs):
                if x.shape != inputs[0].shape:
                    raise ExampleError(b, f"has an input of shape {list(x.shape)}, but example 0 has one of shape "
                                          f"{list(inputs[0].shape)}; give every example the model's input shape")
            xs = torch.stack(inputs)
            ys = torch.as_tensor([int(ex[1]) for ex in examples], dtype=torch.long)
            return {"x": xs, "labels": ys}
        raise InfkitError(
            f"Classification cannot read an example of type {type(first).__name__}; give (x, y) tuples or "
            "dicts of model inputs with 'labels'"
        )

    def forward(self, model, batch):
        if "x" in batch:
            return _call_on_tensor(model, batch["x"])
        if torch.is_tensor(batch.get("input_ids")) and batch["input_ids"].dim() == 2:
            _check_token_ids(model, batch, self.tokenizer,
                             "truncate it when tokenizing: tokenizer(text, truncation=True, max_length={limit})")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return _logits_of(model(**inputs))

    def train_loss(self, model, batch, sample=None):
        logits = self.forward(model, batch)
        _check_class_labels(batch["labels"], logits.shape[-1])
        labels = batch["labels"] if sample is None else _sample_labels(logits, sample)
        return F.cross_entropy(_at_least_float32(logits), labels, reduction="none")

    def token_mask(self, batch):
        return batch.get("attention_mask")

    def tokens(self, batch, index):
        if "input_ids" not in batch:
            return super().tokens(batch, index)
        return _tokens_of(batch, index, self.tokenizer)

    def output_hessian_root(self, model, batch):
        logits = self.forward(model, batch)
        return logits.unsqueeze(1), _softmax_hessian_root(logits).unsqueeze(1)


@dataclass
class CausalLM(Task):
    """Next-token prediction. Train loss = sum of token NLL over labelled tokens; measurement = the same loss,
    so a prompt/completion query measures the completion only.

    Examples (one of):
      * dict with ``input_ids`` (and optionally ``attention_mask``, ``labels`` with -100 for unscored tokens);
      * dict with ``prompt`` and ``completion`` strings (needs ``tokenizer``): only the completion is labelled;
      * a string (needs ``tokenizer``): every token is labelled.
    Batches are right-padded with ``pad_token_id`` and get an attention mask. ``max_length`` cuts longer
    examples: a text or input_ids keeps its first tokens, a prompt/completion its last (the completion is measured).
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    max_length: int | None = None

    def _encode(self, example, position: int) -> dict[str, torch.Tensor]:
        if isinstance(example, str):
            ids = self._tokenize(example)
            return {"input_ids": ids, "labels": ids.clone()}
        if isinstance(example, Mapping) and "prompt" in example and "completion" in example:
            prompt = self._tokenize(example["prompt"])
            completion = self._tokenize(example["completion"])
            if completion.numel() == 0:
                raise InfkitError(
                    f"the completion {example['completion']!r} is empty after tokenization; a prompt/completion "
                    "query measures the completion's loss, so give a non-empty completion"
                )
            ids = torch.cat([prompt, completion])
            labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion])
            return {"input_ids": ids, "labels": labels}
        if isinstance(example, Mapping) and "input_ids" in example:
            raw = torch.as_tensor(example["input_ids"])
            _check_id_dtype(raw, position)
            if raw.dim() > 2 or raw.dim() == 2 and raw.shape[0] != 1:
                raise ExampleError(position, f"has input_ids of shape {list(raw.shape)}; an example is one sequence "
                                             "(1-D, or [1, T]): give each sequence as its own example")
            ids = raw.long().reshape(-1)
            out = {"input_ids": ids}
            if "attention_mask" in example and example["attention_mask"] is not None:
                out["attention_mask"] = torch.as_tensor(example["attention_mask"], dtype=torch.long).reshape(-1)
            elif self.pad_token_id is not None and ids.numel() > 1 and bool(ids[-1] == self.pad_token_id):
                raise InfkitError(
                    f"an example's input_ids end in the pad token ({self.pad_token_id}) but it has no "
                    "attention_mask: padded positions would be scored as text. Pass 'attention_mask' "
                    "(1 for real tokens, 0 for padding) or give unpadded input_ids and let the task pad"
                )
            labels = example.get("labels")
            out["labels"] = ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            for key in ("attention_mask", "labels"):
                if key in out and out[key].numel() != ids.numel():
                    raise ExampleError(position, f"has {out[key].numel()} {key} for {ids.numel()} input_ids; give "
                                                 "one per token")
            if "attention_mask" in out:
                out["labels"] = out["labels"].masked_fill(out["attention_mask"] == 0, IGNORE_INDEX)
            return out
        raise InfkitError(
            f"CausalLM cannot read an example of type {type(example).__name__}; give dicts with input_ids, "
            "dicts with prompt/completion strings, or strings (the last two need tokenizer=...)"
        )

    def _tokenize(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise InfkitError("text examples need a tokenizer: tasks.CausalLM(tokenizer=...)")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.as_tensor(ids, dtype=torch.long).reshape(-1)

    def _truncate(self, encoded: dict[str, torch.Tensor], example) -> dict[str, torch.Tensor]:
        """Cut to ``max_length`` tokens: texts keep their start; a prompt/completion keeps its end (the start of
        the prompt goes), so the measured completion survives."""
        if encoded["input_ids"].numel() <= self.max_length:
            return encoded
        keep_end = isinstance(example, Mapping) and "completion" in example
        cut = slice(-self.max_length, None) if keep_end else slice(None, self.max_length)
        return {k: v[cut] for k, v in encoded.items()}

    def collate(self, examples):
        if not examples:
            raise InfkitError("empty batch: the data has no examples")
        encoded = [self._encode(ex, b) for b, ex in enumerate(examples)]
        if self.max_length is not None:
            encoded = [self._truncate(e, ex) for e, ex in zip(encoded, examples)]
        batch = {
            "input_ids": _right_pad([e["input_ids"] for e in encoded], _pad_id(self.pad_token_id, self.tokenizer)),
            "attention_mask": _right_pad(
                [e.get("attention_mask", torch.ones_like(e["input_ids"])).long() for e in encoded], 0),
            "labels": _right_pad([e["labels"] for e in encoded], IGNORE_INDEX),
        }
        self._check_has_targets(batch)
        return batch

    def _check_has_targets(self, batch) -> None:
        """Refuse an example with no labelled token after its first: the loss predicts token t from those before
        it, so such an example has no loss and no gradient (a curvature fitted on only such examples is 0/0)."""
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1)
        if bool(scored.all()):
            return
        b = int((~scored).nonzero()[0])
        n_real = int(batch["attention_mask"][b].sum())
        raise ExampleError(
            b, f"{_describe(batch, b, self.tokenizer)} has no next-token loss: a causal LM predicts each token from "
               "the ones before it, so an example needs at least 2 real tokens, with a label (not -100) on one after "
               f"the first{'' if n_real < 2 else f'; its {n_real} tokens have none'}. Drop it, or give it more tokens "
               "(a prompt/completion needs a non-empty prompt)"
        )

    def forward(self, model, batch):
        _check_token_ids(model, batch, self.tokenizer,
                         "truncate it with tasks.CausalLM(max_length={limit}) (a prompt/completion keeps its end)")
        return _logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))

    def _shifted(self, model, batch):
        logits = self.forward(model, batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        _check_token_labels(targets, logits.shape[-1])
        return logits, targets

    def train_loss(self, model, batch, sample=None):
        logits, targets = self._shifted(model, batch)
        valid = targets != IGNORE_INDEX
        if sample is not None:
            targets = _sample_labels(logits, sample)
        token_nll = F.cross_entropy(
            _at_least_float32(logits).reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none"
        ).reshape(targets.shape)
        return torch.where(valid, token_nll, torch.zeros_like(token_nll)).sum(dim=1)  # NaN at padding stays out

    def token_mask(self, batch):
        return batch["attention_mask"]

    def tokens(self, batch, index):
        return _tokens_of(batch, index, self.tokenizer)

    def token_losses(self, model, batch):
        """−log p of each labelled token under the model, at the token's own position (position 0 predicts
        nothing), float64; the measurement is their sum over the real positions."""
        with torch.no_grad():
            logits, targets = self._shifted(model, batch)
        measured = targets != IGNORE_INDEX
        log_p = torch.log_softmax(logits.double(), dim=-1)
        nll = torch.where(measured, -log_p.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
        first = torch.zeros_like(nll[:, :1])
        return torch.cat([first, nll], dim=1), torch.cat([first.bool(), measured], dim=1)

    def output_hessian_root(self, model, batch):
        logits, targets = self._shifted(model, batch)
        valid = (targets != IGNORE_INDEX).to(logits.dtype)
        root = _softmax_hessian_root(logits) * valid[..., None, None]
        return logits, root


def _check_id_dtype(ids: torch.Tensor, position: int) -> None:
    if torch.is_floating_point(ids) or torch.is_complex(ids) or ids.dtype == torch.bool:
        raise ExampleError(position, f"has input_ids of dtype {ids.dtype}; token ids are integers: give a list of "
                                     "ints or an integer tensor (ids.long())")


def _describe(batch, b: int, tokenizer) -> str:
    """Example b of a token batch for an error message: its length, and its start as text with a tokenizer."""
    mask = batch.get("attention_mask")
    ids = batch["input_ids"][b] if mask is None else batch["input_ids"][b][mask[b].bool()]
    start = ""
    if tokenizer is not None:
        try:
            text = tokenizer.decode(ids[:8].tolist())
            start = f": {text!r}{' …' if ids.numel() > 8 else ''}"
        except Exception:  # noqa: BLE001 - only a description; e.g. an id the tokenizer does not know
            start = ""
    return f"({ids.numel()} token{'' if ids.numel() == 1 else 's'}{start})"


def _context_length(model) -> int | None:
    """The most positions a transformers model reads (config.n_positions / max_position_embeddings), or None."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _vocab_size(model) -> int | None:
    """How many token ids the model's input embedding has (else config.vocab_size), or None when unknown."""
    embeddings = None
    if callable(getattr(model, "get_input_embeddings", None)):
        try:
            embeddings = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
    size = getattr(embeddings, "num_embeddings", None)
    if size is None:
        size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _check_token_ids(model, batch, tokenizer, truncate: str) -> None:
    """Refuse, before the model runs, a batch longer than the model's context or with token ids outside its
    vocabulary (the model would fail with an IndexError, or a device-side assert on a GPU). One comparison per
    batch; ``truncate`` says how to shorten an example, with ``{limit}`` for the context length."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    limit = _context_length(model)
    if limit is not None and ids.shape[-1] > limit:
        b = int(mask.sum(dim=1).argmax()) if mask is not None else 0
        raise ExampleError(
            b, f"{_describe(batch, b, tokenizer)} is longer than the model's context of {limit} positions "
               f"({ids.shape[-1]} in the batch): {truncate.format(limit=limit)}, or give shorter examples"
        )
    vocab = _vocab_size(model)
    if vocab is None:
        return
    bad = (ids < 0) | (ids >= vocab)
    if not bool(bad.any()):
        return
    b, t = (int(v) for v in bad.nonzero()[0])
    value = int(ids[b, t])
    if mask is not None and not bool(mask[b, t]):
        raise ExampleError(b, f"is padded with id {value}, outside the model's vocabulary of {vocab} token ids "
                              f"(0..{vocab - 1}): give the task a pad_token_id below {vocab}")
    raise ExampleError(
        b, f"has token id {value} at position {t}, outside the model's vocabulary of {vocab} token ids "
           f"(0..{vocab - 1}): check that the tokenizer matches the model (after adding tokens to a tokenizer, "
           "call model.resize_token_embeddings(len(tokenizer)))"
    )


def _check_token_labels(targets: torch.Tensor, n_classes: int) -> None:
    """Next-token labels [B, T-1] (position t+1 of the input) must be ids of the model's output vocabulary."""
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= n_classes))
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise ExampleError(
            b, f"has label {int(targets[b, t])} at position {t + 1}, outside the model's {n_classes} output token "
               f"ids (0..{n_classes - 1}, or {IGNORE_INDEX} for an unscored position): check that the labels are "
               "token ids of this model's tokenizer"
        )


def _check_class_labels(labels: torch.Tensor, n_classes: int) -> None:
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ExampleError(
            b, f"has label {int(labels[b])}, but the model has {n_classes} classes: labels are 0..{n_classes - 1} "
               f"(or {IGNORE_INDEX} for an unscored example). Check the labels, or give the model one output per "
               "class"
        )


def _call_on_tensor(model, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for plain-tensor inputs; an input the model cannot take (wrong shape, size or dtype) is an
    InfkitError that names the batch's shape and dtype, with torch's message. Running out of memory is not wrapped
    (DataPasses retries in smaller batches)."""
    try:
        return _logits_of(model(x))
    except (RuntimeError, IndexError) as err:
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
            raise
        dtype = next((p.dtype for p in model.parameters()), None)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InfkitError(
            f"the model cannot run on this batch: inputs x of shape {list(x.shape)} (one example: "
            f"{list(x.shape[1:])}), dtype {x.dtype}, model dtype {dtype} ({type(err).__name__}: {first_line}). Give "
            "each example as the model takes one input, without a batch dimension (e.g. an image [C, H, W], a "
            f"feature vector of the model's input size), as {dtype} (x.to({dtype})), or integer token ids for an "
            "embedding"
        ) from err


def _pad_id(pad_token_id: int | None, tokenizer: Any) -> int:
    """The id that pads token batches: the task's ``pad_token_id``, else the tokenizer's pad, else its eos, else 0."""
    if pad_token_id is not None:
        return pad_token_id
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return int(getattr(tokenizer, attr))
    return 0


def _right_pad(sequences: list[torch.Tensor], fill: int) -> torch.Tensor:
    """1-D tensors of different lengths -> [B, longest], right-padded with ``fill`` (dtype of the first)."""
    out = torch.full((len(sequences), max(t.shape[0] for t in sequences)), fill, dtype=sequences[0].dtype)
    for row, t in enumerate(sequences):
        out[row, : t.shape[0]] = t
    return out


def _stack(values: list[Any], key: str) -> torch.Tensor:
    tensors = [torch.as_tensor(v) for v in values]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise InfkitError(
            f"examples have different shapes for {key!r} ({sorted(shapes)[:3]}...); pad them to one length "
            "with an attention_mask, or use a task that pads (tasks.CausalLM)"
        )
    return torch.stack(tensors)


def _tokens_of(batch, index: int, tokenizer) -> tuple[list[int], list[str] | None]:
    ids = batch["input_ids"][index]
    mask = batch.get("attention_mask")
    if mask is not None:
        ids = ids[mask[index].bool()]
    id_list = [int(t) for t in ids]
    if tokenizer is None:
        return id_list, None
    return id_list, [tokenizer.decode([t]) for t in id_list]

