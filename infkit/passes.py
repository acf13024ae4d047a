"""Passes over a data set: batches in, captured layer tensors out.

One :class:`DataPasses` object knows the model, the task, the data, the tracked layers, the batch size and the
seed. ``iterate(labels)`` runs the model on each batch under :class:`~infkit.capture.Capture` and yields the
layer inputs a and output gradients s of the chosen objective:

* ``"true"``      the train loss with the data's labels (the train side of a score);
* ``"sampled"``   the train loss with labels drawn from the model (true Fisher), from generators seeded by
                  (seed, example index) so every pass draws the same labels;
* ``"fisher"``    "sampled" or "true", as the analysis' ``fisher=`` setting says;
* ``"measure"``   the task's measurement (the query side of a score).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from infkit.capture import Capture, Layer, per_example_grads
from infkit.errors import InfkitError
from infkit.tasks import Task


@dataclass
class CapturedBatch:
    """What one batch left behind: global example indices, the batch, per-layer a and s, token counts."""

    indices: list[int]
    batch: dict[str, Any]
    activations: dict[str, torch.Tensor]  # a [B, T, d_in]
    output_grads: dict[str, torch.Tensor]  # s [B, T, d_out]
    token_counts: dict[str, int]
    loss: torch.Tensor  # [B]

    def grads(self, name: str) -> torch.Tensor:
        """Per-example gradient ΣW [B, d_out, d_in] of one layer."""
        return per_example_grads(self.activations[name], self.output_grads[name])


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def data_length(data: Any) -> int:
    try:
        return len(data)
    except TypeError as err:
        raise InfkitError(
            f"data of type {type(data).__name__} has no length; give a list, a torch Dataset or a "
            "datasets.Dataset"
        ) from err


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while influence is computed; the model's own mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class DataPasses:
    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        data: Any,
        layers: dict[str, Layer],
        batch_size: int,
        seed: int,
        fisher: str,
        progress: bool = True,
        what: str = "train",
    ):
        self.model, self.task, self.data, self.layers = model, task, data, layers
        self.batch_size, self.seed, self.fisher, self.progress = batch_size, seed, fisher, progress
        self.what = what
        self.n = data_length(data)
        if self.n == 0:
            raise InfkitError(f"the {what} data is empty: influence needs at least one example")
        self.device = model_device(model)

    def collate(self, indices: Sequence[int]) -> dict[str, Any]:
        batch = self.task.collate([self.data[i] for i in indices])
        return self.task.batch_to(batch, self.device)

    def batches(self, desc: str | None = None) -> Iterator[list[int]]:
        """Consecutive index batches; reads ``self.batch_size`` as it goes, so a reduction applies at once."""
        bar = tqdm(total=self.n, desc=desc, disable=not self.progress or desc is None, leave=False, unit="ex")
        start = 0
        with bar:
            while start < self.n:
                indices = list(range(start, min(start + self.batch_size, self.n)))
                yield indices
                bar.update(len(indices))
                start += len(indices)

    def generators(self, indices: Sequence[int]) -> list[torch.Generator]:
        """One generator per example, seeded by (seed, example index): the sampled labels of an example are the
        same in every pass and whatever the batch size."""
        return [torch.Generator().manual_seed(self.seed * 1_000_003 + i) for i in indices]

    def objective(self, labels: str, batch: dict[str, Any], indices: Sequence[int]) -> torch.Tensor:
        if labels == "fisher":
            labels = "sampled" if self.fisher == "sampled" else "true"
        if labels == "true":
            return self.task.train_loss(self.model, batch, sample=None)
        if labels == "sampled":
            return self.task.train_loss(self.model, batch, sample=self.generators(indices))
        if labels == "measure":
            return self.task.measurement(self.model, batch)
        raise ValueError(f"unknown label mode {labels!r}")

    def capture(self, indices: list[int], labels: str) -> CapturedBatch:
        batch = self.collate(indices)
        with eval_mode(self.model), torch.enable_grad(), Capture(self.layers, self.task.token_mask(batch)) as cap:
            loss = self.objective(labels, batch, indices)
            self.check_finite(loss, indices)
            s = cap.output_grads(loss)
            a = cap.activations()
            counts = cap.token_counts()
        return CapturedBatch(indices, batch, a, s, counts, loss.detach())

    def iterate(self, labels: str, desc: str | None = None) -> Iterator[CapturedBatch]:
        for indices in self.batches(desc):
            yield from self._capture_or_split(indices, labels)

    def _capture_or_split(self, indices: list[int], labels: str) -> Iterator[CapturedBatch]:
        """Capture a batch; when it runs out of memory, halve the batch size (for good) and retry in halves."""
        try:
            captured = self.capture(indices, labels)
        except RuntimeError as err:
            if not is_out_of_memory(err) or len(indices) == 1:
                raise
            half = len(indices) // 2
            self.batch_size = min(self.batch_size, half)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(
                f"a batch of {len(indices)} {self.what} examples ran out of memory; continuing with "
                f"batch_size={self.batch_size} (pass a smaller batch_size= to skip this retry)",
                stacklevel=3,
            )
            yield from self._capture_or_split(indices[:half], labels)
            yield from self._capture_or_split(indices[half:], labels)
            return
        yield captured

    def check_finite(self, loss: torch.Tensor, indices: list[int]) -> None:
        bad = ~torch.isfinite(loss.detach())
        if bool(bad.any()):
            first = indices[int(bad.nonzero()[0])]
            raise InfkitError(
                f"the loss of {self.what} example {first} is {float(loss.detach()[bad][0])}: influence needs "
                "finite losses. Check that example (empty labels, extreme inputs) or the model's weights for NaN"
            )
