"""Several processes (torchrun, several GPUs or machines) through torch.distributed: who holds which train examples,
and the few collectives an analysis needs.

Inside a torchrun job (``torch.distributed.init_process_group`` called, gloo or NCCL), every rank builds the same
``Analysis`` on the same model and train data; each rank then takes a contiguous shard of the train examples
(:meth:`World.shard`: the first ``n % world`` ranks take one more), runs the passes over its shard only, and the
estimators sum their statistics over the ranks (:meth:`World.sum`) before finishing them, so every rank ends with
the same curvature (eigenbases are broadcast from rank 0, so they are the same bits everywhere). Each rank stores
the train side of its own shard; ``scores()`` computes the query side on every rank (the same queries: the same
numbers), scores the local shard and gathers the columns into [n_query, n_train] on every rank.

Sampled Fisher labels are seeded by (seed, draw, global example index) (:func:`infkit.passes.draw_seed`), so a
sharded run draws the same labels as one process, whatever the world size.

A rank that dies or hangs makes the others' next collective fail after the process group's timeout (the
``timeout=`` of ``init_process_group``): :meth:`World.collective` turns that into an :class:`InfkitError` saying so.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from infkit.errors import InfkitError


def _dist():
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class World:
    """This process' place among the ranks of a job: rank, world size (1: one process, no collectives)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> range:
        """The contiguous train examples of this rank: ranks below n % size take ceil(n / size), the others floor."""
        return shard_range(n, self.rank, self.size)

    # -- collectives (no-ops in one process) ------------------------------------------------------------------
    @contextmanager
    def collective(self, what: str):
        """Run collectives, turning a failed or timed-out one into an error that says what happened."""
        try:
            yield
        except RuntimeError as err:
            raise InfkitError(
                f"rank {self.rank} of {self.size}: the collective '{what}' failed — another rank died, was killed "
                f"or did not reach it within the process group's timeout ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else 'no message'}). Check the other ranks' logs; a "
                "shorter timeout= in init_process_group() makes a hang fail sooner"
            ) from err

    def sum(self, tensor: torch.Tensor, what: str = "sum") -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (in place and returned); float64 sums stay float64."""
        if not self.active:
            return tensor
        with self.collective(what):
            _dist().all_reduce(tensor)
        return tensor

    def sum_number(self, value: float, what: str = "sum") -> float:
        return float(self.sum(torch.tensor([float(value)], dtype=torch.float64, device=self.device), what))

    def broadcast(self, tensor: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (in place and returned)."""
        if not self.active:
            return tensor
        with self.collective(what):
            _dist().broadcast(tensor, src=0)
        return tensor

    def gather_objects(self, obj: Any, what: str = "gather") -> list[Any]:
        """Every rank's (picklable) ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.size
        with self.collective(what):
            _dist().all_gather_object(gathered, obj)
        return gathered

    def gather_columns(self, local: torch.Tensor, what: str = "gather scores") -> torch.Tensor:
        """[..., n_local] on each rank (its shard's columns) -> [..., n] on every rank, shards in rank order."""
        if not self.active:
            return local
        return self.gather_rows(local.movedim(-1, 0).contiguous(), what).movedim(0, -1).contiguous()

    def gather_rows(self, local: torch.Tensor, what: str = "gather rows") -> torch.Tensor:
        """[n_local, ...] on each rank -> [n, ...] on every rank, in rank order (uneven shards padded for the
        collective)."""
        if not self.active:
            return local
        sizes = self.gather_objects(int(local.shape[0]), what)
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in range(self.size)]
        with self.collective(what):
            _dist().all_gather(pieces, padded)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])

    def most(self, count: int, what: str = "count rounds") -> int:
        """The largest ``count`` of any rank (how many rounds of a collective loop every rank must run)."""
        return max(self.gather_objects(int(count), what)) if self.active else count

    def broadcast_rows(self, rows: dict[str, torch.Tensor] | None, src: int, what: str) -> dict[str, torch.Tensor]:
        """Rank ``src``'s {name: tensor} on every rank (the others pass None)."""
        layout = [{name: (tuple(t.shape), t.dtype, str(t.device)) for name, t in rows.items()} if rows else None]
        with self.collective(what):
            _dist().broadcast_object_list(layout, src=src)
        received = {name: rows[name].contiguous() if self.rank == src else
                    torch.empty(shape, dtype=dtype, device=self.device)
                    for name, (shape, dtype, _) in layout[0].items()}
        for t in received.values():
            self.broadcast_from(t, src, what)
        return received

    def broadcast_from(self, tensor: torch.Tensor, src: int, what: str) -> torch.Tensor:
        with self.collective(what):
            _dist().broadcast(tensor, src=src)
        return tensor

    def on_own_rows(self, fn, rows: dict[str, torch.Tensor], needs_all: bool):
        """``fn(rows)`` of this rank's own rows (its train examples), where ``fn`` may itself need collectives
        (``needs_all``: DataInf's preconditioning sums over every rank's stored gradients): every rank then takes
        its turn, broadcasting its rows for all ranks to compute ``fn`` on together, and keeps its own result."""
        if not (self.active and needs_all):
            return fn(rows)
        mine = None
        for src in range(self.size):
            shared = self.broadcast_rows(rows if src == self.rank else None, src, "share rows to precondition")
            result = fn(shared)
            if src == self.rank:
                mine = result
        return mine

    @property
    def device(self) -> torch.device:
        """Where collectives' small tensors go: the current CUDA device under NCCL, else the CPU."""
        if self.active and _dist().get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = World()


def shard_range(n: int, rank: int, size: int) -> range:
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def resolve_world(option: bool | None) -> World:
    """The world an analysis runs in: ``distributed=None`` (default) the initialised process group if there is one
    (else one process), True: the process group, refused when none is initialised, False: one process."""
    dist = _dist()
    initialised = dist.is_available() and dist.is_initialized()
    if option is True and not initialised:
        raise InfkitError("distributed=True, but no torch.distributed process group is initialised: launch with "
                          "torchrun and call torch.distributed.init_process_group() before building the Analysis")
    if option is False or not initialised:
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size())


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """A DistributedDataParallel-wrapped model as the module it wraps (influence needs no gradient sync); FSDP is
    refused: its parameters are sharded across the ranks, and influence needs every tracked layer whole."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        FullyShardedDataParallel = ()  # noqa: N806
    fsdp = bool(FullyShardedDataParallel) and isinstance(model, FullyShardedDataParallel)
    if fsdp or type(model).__name__.startswith("FSDP"):  # FSDP1's wrapper, or FSDP2's fully_shard classes
        raise InfkitError(
            "FSDP-wrapped models are not supported: FSDP shards each layer's parameters across the ranks, and "
            "infkit needs every tracked layer whole on every rank. Give the unwrapped model (loaded whole on each "
            "rank; infkit shards the train data, not the model)"
        )
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def sample_digest(task, data, n_samples: int = 32) -> str:
    """A sha256 of a few collated train examples spread over the data (evenly strided) and its size: what the ranks
    compare so a rank given other data is refused, without reading all of it."""
    from infkit.fingerprint import _hash_tensor

    n = len(data)
    step = max(1, n // n_samples)
    indices = list(range(0, n, step))[:n_samples]
    h = hashlib.sha256(str(n).encode())
    batch = task.collate([data[i] for i in indices])
    for key in sorted(batch):
        if torch.is_tensor(batch[key]):
            h.update(key.encode())
            _hash_tensor(h, batch[key])
    return h.hexdigest()


def check_same_everywhere(world: World, analysis) -> None:
    """Refuse, before any pass, ranks whose model, train data or settings differ from rank 0's."""
    if not world.active:
        return
    from infkit.fingerprint import model_fingerprint

    mine = {
        "model": model_fingerprint(analysis.model, analysis.layers)["state_sha256"],
        "train data": sample_digest(analysis.task, analysis.train_data),
        "settings": repr((analysis.estimator.name, analysis.estimator.damping, analysis.seed, analysis.fisher,
                          analysis.fisher_samples, analysis.batch_size, analysis.store_setting, analysis.projection,
                          sorted(analysis.estimator_options.items()))),
    }
    everyone = world.gather_objects(mine, "compare fingerprints")
    problems = [f"rank {rank}'s {what}" for rank, theirs in enumerate(everyone) for what in mine
                if theirs[what] != everyone[0][what]]
    if problems:
        raise InfkitError(
            f"the ranks do not agree: {', '.join(problems)} differ(s) from rank 0's. Every rank must build the "
            "Analysis on the same model weights, the same train data (in the same order) and the same settings; "
            "each rank then takes its own shard of the data itself"
        )
