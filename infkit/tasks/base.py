"""The task protocol: what a model's training loss and a query's measurement are, and which labels a pass uses.

A task turns a list of examples into a batch (``collate``), runs the model (``forward``), and gives per-example
losses. infkit's conventions (docs/design.md §2):

* ``train_loss(model, batch, sample=...)`` returns one loss per example, a **sum** over its tokens, shape [B].
  With ``sample`` a list of ``torch.Generator`` (one per example), the labels are drawn from the model's own
  predictive distribution (true Fisher); with ``sample=None`` the data's labels are used.
* ``measurement(model, batch)`` returns one value per query, shape [B]; its gradient is the query side of a
  score. By default it is the loss of the labelled tokens, so for a prompt/completion pair it measures the
  completion.
* ``token_mask(batch)`` marks the real (unpadded) positions, shape [B, T], or ``None`` for inputs without
  positions. Padded positions contribute nothing.
* ``token_losses(model, batch)`` (optional, sequence tasks) gives each input position's share of the measurement,
  so the views can show which tokens of a query carry its loss.
* ``output_hessian_root(model, batch)`` (optional) returns the model outputs z [B, P, C] and a root R
  [B, P, C, C] with R Rᵀ = ∂²loss/∂z² at each position; the exact estimator builds the GGN from it.

A custom task subclasses :class:`Task` and overrides what differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import torch

from infkit.errors import InfkitError

#: Label value of positions that are not scored (as in transformers and torch's cross-entropy).
IGNORE_INDEX = -100


class ExampleError(InfkitError):
    """Bad input in one example of a batch. A task sees only the batch it is given, so the message names the
    example by its ``position`` in that batch (and, for text, by its start); ``problem`` is the rest of the
    message, for a caller that knows the example's index in the data to say it with that index instead."""

    def __init__(self, position: int, problem: str):
        self.position, self.problem = position, problem
        super().__init__(f"example {position} of the batch {problem}")

    def __reduce__(self):  # picklable (e.g. out of a worker process) although __init__ takes two arguments
        return type(self), (self.position, self.problem)


class Labels(Enum):
    """Which objective a pass over the data differentiates (:meth:`infkit.passes.DataPasses.iterate`).

    * ``DATA``          the train loss with the data's own labels: the train side of a score, and the empirical
                        Fisher;
    * ``MODEL_SAMPLED`` the train loss with labels drawn from the model's predictive distribution (one seeded
                        generator per example and pass): the true Fisher of Grosse et al.;
    * ``CURVATURE``     whichever of the two the analysis' ``fisher=`` names ("sampled" or "empirical"): what an
                        estimator's curvature pass asks for;
    * ``MEASUREMENT``   the task's measurement of a query (the query side of a score);
    * ``GGN_ROOT``      the exact Gauss-Newton: one backward per live position and output class of the root R of
                        the loss' output Hessian (``Task.output_hessian_root``); each yielded batch holds the
                        gradient rows Jᵀ R[:, c] of one (position, class).
    """

    DATA = "data"
    MODEL_SAMPLED = "model-sampled"
    CURVATURE = "curvature"
    MEASUREMENT = "measurement"
    GGN_ROOT = "ggn-root"


class Task:
    """Base class and protocol for tasks. Subclasses define at least ``collate``, ``forward``, ``train_loss``."""

    tokenizer: Any = None

    def collate(self, examples: Sequence[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def train_loss(self, model, batch, sample: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def measurement(self, model, batch) -> torch.Tensor:
        return self.train_loss(model, batch, sample=None)

    def token_mask(self, batch) -> torch.Tensor | None:
        return None

    def tokens(self, batch, index: int) -> tuple[list[int], list[str] | None]:
        """Token ids of one example (unpadded) and their text when the task has a tokenizer."""
        raise NotImplementedError(f"{type(self).__name__} has no tokens; per-token scores need a sequence task")

    def token_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each input position's part of the measurement: (losses [B, T] float64, measured [B, T] bool), aligned
        with ``input_ids`` (0 and False where nothing is measured). Sequence tasks define it."""
        raise NotImplementedError(f"{type(self).__name__} has no per-token losses")

    def output_hessian_root(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(
            f"{type(self).__name__} does not define output_hessian_root, which the exact GGN needs; "
            "use fisher='empirical' or implement it"
        )

    def batch_to(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
