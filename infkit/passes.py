"""Passes over a data set: batches in, captured layer tensors out.

One :class:`DataPasses` object knows the model, the task, the data, the tracked layers, the batch size and the
seed. ``iterate(labels)`` runs the model on each batch under :class:`~infkit.capture.Capture` and yields the
layer inputs a and output gradients s of the chosen objective:

* ``"true"``      the train loss with the data's labels (the train side of a score);
* ``"sampled"``   the train loss with labels drawn from the model (true Fisher), from a generator seeded by
                  (seed, batch start) so every pass draws the same labels;
* ``"fisher"``    "sampled" or "true", as the analysis' ``fisher=`` setting says;
* ``"measure"``   the task's measurement (the query side of a score).
"""

from __future__ import annotations

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
        starts = range(0, self.n, self.batch_size)
        bar = tqdm(starts, desc=desc, disable=not self.progress or desc is None, leave=False, unit="batch")
        for start in bar:
            yield list(range(start, min(start + self.batch_size, self.n)))

    def generator(self, batch_start: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + batch_start)

    def objective(self, labels: str, batch: dict[str, Any], batch_start: int) -> torch.Tensor:
        if labels == "fisher":
            labels = "sampled" if self.fisher == "sampled" else "true"
        if labels == "true":
            return self.task.train_loss(self.model, batch, sample=None)
        if labels == "sampled":
            return self.task.train_loss(self.model, batch, sample=self.generator(batch_start))
        if labels == "measure":
            return self.task.measurement(self.model, batch)
        raise ValueError(f"unknown label mode {labels!r}")

    def capture(self, indices: list[int], labels: str) -> CapturedBatch:
        batch = self.collate(indices)
        with eval_mode(self.model), torch.enable_grad(), Capture(self.layers, self.task.token_mask(batch)) as cap:
            loss = self.objective(labels, batch, indices[0])
            self.check_finite(loss, indices)
            s = cap.output_grads(loss)
            a = cap.activations()
            counts = cap.token_counts()
        return CapturedBatch(indices, batch, a, s, counts, loss.detach())

    def iterate(self, labels: str, desc: str | None = None) -> Iterator[CapturedBatch]:
        for indices in self.batches(desc):
            yield self.capture(indices, labels)

    def check_finite(self, loss: torch.Tensor, indices: list[int]) -> None:
        bad = ~torch.isfinite(loss.detach())
        if bool(bad.any()):
            first = indices[int(bad.nonzero()[0])]
            raise InfkitError(
                f"the loss of {self.what} example {first} is {float(loss.detach()[bad][0])}: influence needs "
                "finite losses. Check that example (empty labels, extreme inputs) or the model's weights for NaN"
            )
