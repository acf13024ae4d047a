"""Passes over a data set: batches in, captured layer tensors out — the one place that runs the model for influence.

One :class:`DataPasses` object knows the model, the task, the data, the tracked layers, the batch size, the seed and
the analysis' ``fisher=`` setting. ``iterate(labels)`` runs the model on each batch in eval mode under
:class:`~infkit.capture.Capture` and yields the layer inputs a and output gradients s of the objective that
``labels`` (:class:`infkit.tasks.Labels`) names: the data's labels, labels sampled from the model (seeded by
(seed, example index), so every pass and batch size draws the same labels), the curvature's choice of the two, the
query measurement, or the rows of the exact Gauss-Newton. A batch that runs out of memory is split in halves and the
batch size reduced for good, whatever the labels.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from infkit.capture import Capture, Layer, per_example_grads
from infkit.distributed import SINGLE, World
from infkit.errors import InfkitError
from infkit.tasks.base import ExampleError, Labels, Task

#: the sampled-Fisher GGN takes one backward pass per position and output class; above this many classes (a real
#: LM's vocabulary) it refuses rather than run for hours.
MAX_GGN_CLASSES = 1024


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


def draw_seed(seed: int, draw: int, index: int) -> int:
    """A 63-bit generator seed for (seed, draw, example index), mixed by blake2b so nearby triples are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{draw}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
    """Dropout off (and BatchNorm on its running statistics) while influence is computed; afterwards, also after
    an error, every module's own mode is restored as it was — a BatchNorm the user froze in eval inside a model in
    train mode stays in eval."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


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
        fisher: str | None,
        progress: bool = True,
        what: str = "train",
        fisher_samples: int = 1,
        shard: range | None = None,
        world: World = SINGLE,
    ):
        self.model, self.task, self.data, self.layers = model, task, data, layers
        self.batch_size, self.seed, self.fisher, self.progress = batch_size, seed, fisher, progress
        self.fisher_samples = fisher_samples  # draws of the model's labels per example in a sampled pass
        self.what = what
        total = data_length(data)
        if total == 0:
            raise InfkitError(f"the {what} data is empty: influence needs at least one example")
        # With several processes (infkit.distributed) a pass covers this rank's shard only: its batches' indices
        # are local (0 .. n-1, rows of this rank's store); ``offset`` + index is the example's index in the data.
        shard = shard if shard is not None else range(total)
        self.offset, self.n = shard.start, len(shard)
        self.n_total, self.world = total, world  # every rank's examples; estimators sum statistics over world
        self.device = model_device(model)

    @contextmanager
    def naming_examples(self, indices: Sequence[int]):
        """A task's error about one example of a batch (it knows only the batch position) re-raised with the
        example's index in the data."""
        try:
            yield
        except ExampleError as err:
            raise InfkitError(f"{self.what} example {self.offset + indices[err.position]} {err.problem}") from err

    def collate(self, indices: Sequence[int]) -> dict[str, Any]:
        with self.naming_examples(indices):
            batch = self.task.collate([self.data[self.offset + i] for i in indices])
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

    def generators(self, indices: Sequence[int], draw: int = 0) -> list[torch.Generator]:
        """One generator per example on the model's device, seeded by (seed, draw, example index): an example's
        sampled labels do not depend on the batch size, the order or the number of processes, and each draw (an
        estimator's pass, or one of ``fisher_samples``) is independent of the others."""
        return [torch.Generator(device=self.device).manual_seed(draw_seed(self.seed, draw, self.offset + i))
                for i in indices]

    def objective(self, labels: Labels, batch: dict[str, Any], indices: Sequence[int], draw: int = 0) -> torch.Tensor:
        """The per-example loss [B] whose gradients a pass with ``labels`` captures (``draw``: which sample of
        the model's labels, for MODEL_SAMPLED)."""
        if labels is Labels.CURVATURE:
            labels = Labels.MODEL_SAMPLED if self.fisher == "sampled" else Labels.DATA
        if labels is Labels.DATA:
            return self.task.train_loss(self.model, batch, sample=None)
        if labels is Labels.MODEL_SAMPLED:
            return self.task.train_loss(self.model, batch, sample=self.generators(indices, draw))
        if labels is Labels.MEASUREMENT:
            return self.task.measurement(self.model, batch)
        raise ValueError(f"{labels!r} is not a loss (GGN_ROOT batches come from ggn_captures)")

    def capture(self, indices: list[int], labels: Labels, draw: int = 0) -> CapturedBatch:
        batch = self.collate(indices)
        self.check_finite_inputs(batch, indices)
        with eval_mode(self.model), torch.enable_grad(), Capture(self.layers, self.task.token_mask(batch)) as cap, \
                self.naming_examples(indices):
            loss = self.objective(labels, batch, indices, draw)
            self.check_finite(loss, indices)
            s = cap.output_grads(loss)
            a = cap.activations()
            counts = cap.token_counts()
        self.check_finite_captures(a, s, indices)
        return CapturedBatch(indices, batch, a, s, counts, loss.detach())

    def ggn_captures(self, indices: list[int]) -> Iterator[CapturedBatch]:
        """The exact GGN's rows of one batch: for each live position p and output class c, the output gradients
        of z_p · R_p[:, c] (R the task's root of the loss' output Hessian, R Rᵀ = ∂²ℓ/∂z_p²), so that
        ``grads(name)`` is J_pᵀ R_p[:, c] of every example and G = (1/n) Σ over all rows of row rowᵀ. One backward
        per (position, class): only for small models and few classes (the caller checks)."""
        batch = self.collate(indices)
        self.check_finite_inputs(batch, indices)
        with eval_mode(self.model), torch.enable_grad(), Capture(self.layers, self.task.token_mask(batch)) as cap, \
                self.naming_examples(indices):
            outputs, root = self.task.output_hessian_root(self.model, batch)  # [B, P, C], [B, P, C, C]
            self.check_ggn_classes(root.shape[-1])
            a = cap.activations()
            counts = cap.token_counts()
            live_positions = root.detach().abs().flatten(2).sum(dim=(0, 2)).nonzero().flatten().tolist()
            for position in live_positions:
                for column in range(root.shape[-1]):
                    weights = torch.zeros_like(outputs)
                    weights[:, position, :] = root[:, position, :, column]
                    s = cap.output_grads((outputs * weights).flatten(1).sum(dim=1), retain_graph=True)
                    yield CapturedBatch(indices, batch, a, s, counts, torch.zeros(len(indices)))

    @staticmethod
    def check_ggn_classes(n_classes: int) -> None:
        if n_classes > MAX_GGN_CLASSES:
            raise InfkitError(
                f"the exact GGN (fisher='sampled') needs one backward pass per position and output class, and "
                f"this model has {n_classes} classes (a language model's vocabulary?): that would take "
                "hours. Use fisher='empirical' (exact inverse of the empirical Fisher; with fewer examples than "
                "parameters it is cheap) or track a model with fewer outputs"
            )

    def iterate(self, labels: Labels, desc: str | None = None, draw: int = 0) -> Iterator[CapturedBatch]:
        """Captured batches of the whole data under ``labels``. ``draw`` numbers the independent samples of the
        model's labels (an estimator's second pass asks for another draw than its first). A sampled pass with
        ``fisher_samples=k`` yields each batch k times, with k independent draws: estimators count examples by the
        batches they see, so their averages are over n·k draws."""
        sampled = labels is Labels.MODEL_SAMPLED or (labels is Labels.CURVATURE and self.fisher == "sampled")
        draws = self.fisher_samples if sampled else 1
        for indices in self.batches(desc):
            for k in range(draws):  # fisher_samples draws: the same examples again, with other labels
                yield from self._capture_or_split(indices, labels, draw * draws + k)

    def _capture_or_split(self, indices: list[int], labels: Labels, draw: int = 0) -> Iterator[CapturedBatch]:
        """Capture a batch; when it runs out of memory, halve the batch size (for good) and retry in halves.

        A GGN_ROOT batch yields many captures; only running out of memory before its first one splits it (later
        ones would repeat rows already yielded)."""
        try:
            if labels is Labels.GGN_ROOT:
                captures = self.ggn_captures(indices)
                first = next(captures, None)
            else:
                captures, first = iter(()), self.capture(indices, labels, draw)
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
            yield from self._capture_or_split(indices[:half], labels, draw)
            yield from self._capture_or_split(indices[half:], labels, draw)
            return
        if first is not None:
            yield first
        yield from captures

    def check_finite(self, loss: torch.Tensor, indices: list[int]) -> None:
        bad = ~torch.isfinite(loss.detach())
        if bool(bad.any()):
            first = self.offset + indices[int(bad.nonzero()[0])]
            raise InfkitError(
                f"the loss of {self.what} example {first} is {float(loss.detach()[bad][0])}: influence needs "
                "finite losses. Check that example (empty labels, extreme inputs) or the model's weights for NaN"
            )

    def check_finite_inputs(self, batch: dict[str, Any], indices: list[int]) -> None:
        """Refuse a batch whose float inputs hold inf or NaN, naming the example (its scores would be NaN)."""
        for key, value in batch.items():
            if torch.is_tensor(value) and value.is_floating_point() and value.ndim >= 1 and len(value) == len(indices):
                bad = ~torch.isfinite(value).reshape(len(indices), -1).all(dim=1)
                if bool(bad.any()):
                    first = self.offset + indices[int(bad.nonzero()[0])]
                    raise InfkitError(
                        f"{self.what} example {first} has non-finite values (inf or NaN) in its input {key!r}: "
                        "influence through it would be NaN. Clean or drop that example"
                    )

    def check_finite_captures(self, a: dict[str, torch.Tensor], s: dict[str, torch.Tensor], indices: list[int]) -> None:
        """Refuse inf/NaN layer inputs or output gradients (a finite loss can still overflow in its backward)."""
        for kind, tensors in (("inputs", a), ("output gradients", s)):
            for name, t in tensors.items():
                bad = ~torch.isfinite(t).reshape(len(indices), -1).all(dim=1)
                if bool(bad.any()):
                    first = self.offset + indices[int(bad.nonzero()[0])]
                    raise InfkitError(
                        f"layer {name!r} has non-finite {kind} (inf or NaN) for {self.what} example {first}: its "
                        "gradient would poison every score. Check that example's inputs and the model's weights; "
                        "in half precision, an overflow: try float32"
                    )
