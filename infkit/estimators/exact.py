"""Exact reference: the damped Gauss-Newton matrix over the tracked parameters, solved in float64.

Note:
    With P tracked parameters and per-example gradients flattened layer by layer (each [d_out, d_in] row-major):

    * ``fisher="sampled"`` (default): the GGN itself, G = (1/n) Σ_i Σ_t J_tᵀ H_t J_t, H_t = ∂²ℓ/∂z_t² — the
      expectation of the sampled Fisher, computed without sampling. The task gives a root R_t (R_t R_tᵀ = H_t);
      each column of R_t, back-propagated from position t alone, yields one vector J_tᵀ R_t[:, c]; G sums their
      outer products. Cost: positions × classes backward passes per batch (so not for a large vocabulary).
    * ``fisher="empirical"``: G = (1/n) Σ_i g_i g_iᵀ = XᵀX with the rows x_i = g_i / √n of X [n, P].

    ``block_diagonal=True`` keeps only the per-layer blocks (the reference for block-diagonal estimators such as
    EK-FAC and DataInf); each block is then held and solved on its own. A block is stored in one of two forms:

    * dense: G_b [P_b, P_b] and the Cholesky factor of G_b + D_b (D = diag(λ) per parameter);
    * low rank, for the empirical Fisher when n < P_b: only X_b [n, P_b], applied through Woodbury's identity

          (D + XᵀX)⁻¹ v = D⁻¹v − D⁻¹Xᵀ (I + X D⁻¹ Xᵀ)⁻¹ X D⁻¹ v,

      which is exact and costs n·P_b memory and one n × n Cholesky factor — this is what makes the exact
      empirical-Fisher inverse affordable on the hundreds of thousands of parameters of a LoRA adapter.

    λ: a float, a per-layer dict, or by default a tenth of the mean eigenvalue — 0.1 · trace(G_l) / P_l of each
    layer's block with ``block_diagonal=True``, 0.1 · trace(G) / P of the whole matrix otherwise.
    Memory is capped at ``max_params²`` float64 entries in all (Σ P_b² dense, n·P_b low rank), i.e. a dense
    ``max_params × max_params`` matrix; above it the estimator refuses with the sizes.
"""

from __future__ import annotations

import torch

from infkit.errors import InfkitError
from infkit.estimators.base import Estimator, Grads, register
from infkit.tasks.base import Labels

DEFAULT_MAX_PARAMS = 20_000
#: GGN rows are added to the dense blocks in chunks of at least this many (one large Σ rowᵀrow product)
ROWS_PER_UPDATE = 2048


@register("exact")
class Exact(Estimator):
    # The reference of the block-diagonal estimators: by default the GGN, which the sampled Fisher of EK-FAC and
    # K-FAC estimates, computed exactly (no sampling); fisher="empirical" is the reference of DataInf and LiSSA.
    default_fisher = "sampled"
    fisher_reason = "the Gauss-Newton matrix computed exactly, the expectation of the sampled Fisher"
    def __init__(self, layers, damping=None, block_diagonal: bool = False, max_params: int = DEFAULT_MAX_PARAMS):
        super().__init__(layers, damping)
        self.block_diagonal = block_diagonal
        self.max_params = max_params
        self.n_params = sum(layer.n_params for layer in layers.values())
        names = list(layers)
        self.blocks: list[list[str]] = [[name] for name in names] if block_diagonal else [names]
        self.block_sizes = [sum(layers[n].n_params for n in block) for block in self.blocks]
        self.forms: list[str] = []  # per block: "dense" or "lowrank", set by check_fits / fit
        self.dense: dict[int, torch.Tensor] = {}  # block -> G_b [P_b, P_b] float64
        self.rows: dict[int, torch.Tensor] = {}  # block -> X_b [n, P_b] float64, G_b = X_bᵀ X_b
        self._solvers: dict[int, torch.Tensor] = {}  # block -> Cholesky factor (of G_b + D_b, or of I + X D⁻¹ Xᵀ)

    # -- size --------------------------------------------------------------------------------------------------
    def check_fits(self, n_train: int, fisher: str) -> None:
        """Choose each block's form and refuse, naming the sizes, when the float64 curvature would exceed
        ``max_params²`` entries (called by the analysis at construction, when n and the Fisher are known)."""
        self.forms = ["lowrank" if fisher == "empirical" and n_train < size else "dense" for size in self.block_sizes]
        entries = sum(size * (n_train if form == "lowrank" else size)
                      for form, size in zip(self.forms, self.block_sizes))
        if entries <= self.max_params**2:
            return
        sizes = ", ".join(f"{n}: {layer.n_params}" for n, layer in list(self.layers.items())[:6])
        more = ", ..." if len(self.layers) > 6 else ""
        if len(self.blocks) == 1 and self.forms[0] == "dense":
            shape = f"a dense {self.n_params} x {self.n_params} float64 matrix"
        else:
            shape = f"{len(self.blocks)} float64 blocks of {self.n_params} parameters in all"
        hint = "" if fisher == "empirical" else (
            "; with fisher='empirical' and fewer train examples than parameters it keeps only the n x P gradients")
        raise InfkitError(
            f"the exact estimator builds {shape} ({entries * 8 / 2**30:.1f} GiB), above its limit of "
            f"{self.max_params} tracked parameters ({self.max_params} x {self.max_params} float64 entries; layers: "
            f"{sizes}{more}). Track fewer layers with modules=, use a smaller LoRA rank, use block_diagonal=True"
            f"{hint}, or raise max_params= if you have the memory"
        )

    def fills_train_side(self, fisher: str) -> bool:
        return fisher == "empirical"  # the fit pass computes every train gradient, which is exact's train side

    def describe_factors(self) -> str:
        forms = self.forms or ["dense"] * len(self.blocks)
        counts = {form: forms.count(form) for form in ("dense", "lowrank") if form in forms}
        parts = [f"{k} dense" if form == "dense" else f"{k} low-rank (Woodbury, n x P)" for form, k in counts.items()]
        return f"{len(self.blocks)} block(s): " + ", ".join(parts)

    def planned_factor_bytes(self, n_train: int) -> int:
        forms = self.forms or ["dense"] * len(self.blocks)
        return sum(8 * size * (n_train if form == "lowrank" else 2 * size)
                   for form, size in zip(forms, self.block_sizes))

    # -- layout ------------------------------------------------------------------------------------------------
    def flatten(self, grads: Grads, block: list[str] | None = None) -> torch.Tensor:
        names = block if block is not None else list(self.layers)
        return torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in names], dim=1)

    def unflatten(self, flat: torch.Tensor, block: list[str] | None = None) -> Grads:
        out, start = {}, 0
        for name in block if block is not None else self.layers:
            layer = self.layers[name]
            out[name] = flat[:, start : start + layer.n_params].reshape(-1, layer.d_out, layer.d_in)
            start += layer.n_params
        return out

    def _block_slices(self) -> list[slice]:
        bounds = torch.tensor([0] + self.block_sizes).cumsum(0).tolist()
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    # -- fit ---------------------------------------------------------------------------------------------------
    def fit(self, passes, keep=None):
        if not self.forms:
            self.check_fits(passes.n_total, passes.fisher)
        # several processes: this rank's rows (passes.n) of all n examples; sums and rows combined below
        device, n = passes.device, passes.n_total
        self.dense = {b: torch.zeros(size, size, dtype=torch.float64, device=device)
                      for b, (size, form) in enumerate(zip(self.block_sizes, self.forms)) if form == "dense"}
        self.rows = {b: torch.zeros(passes.n, size, dtype=torch.float64, device=device)
                     for b, (size, form) in enumerate(zip(self.block_sizes, self.forms)) if form == "lowrank"}
        if passes.fisher == "empirical":
            for cb in passes.iterate(Labels.DATA, desc="exact: empirical Fisher"):
                grads = {name: cb.grads(name) for name in self.layers}
                self._accumulate(self.flatten(grads).double() / n**0.5,
                                 rows_at=torch.as_tensor(cb.indices, device=device))
                if keep is not None:  # these are the train gradients: the cached train side as well
                    for name, store in keep.items():
                        store[cb.indices] = grads[name].to(device=store.device, dtype=store.dtype)
        else:
            keep = None
            rows: list[torch.Tensor] = []  # GGN rows Jᵀ R[:, c] of one batch, gathered into large updates
            batch: list[int] | None = None
            for cb in passes.iterate(Labels.GGN_ROOT, desc="exact: GGN"):
                if rows and (cb.indices != batch or sum(r.shape[0] for r in rows) >= ROWS_PER_UPDATE):
                    self._accumulate(torch.cat(rows).double())
                    rows.clear()
                batch = cb.indices
                rows.append(self.flatten({name: cb.grads(name) for name in self.layers}))
            if rows:
                self._accumulate(torch.cat(rows).double())
            for gram in self.dense.values():
                gram /= n
        for gram in self.dense.values():
            passes.world.sum(gram, "sum the curvature")
        self.rows = {b: passes.world.gather_rows(rows, "gather curvature rows") for b, rows in self.rows.items()}
        self._set_damping()
        return self.fitted(train_side=keep)

    def _accumulate(self, rows: torch.Tensor, rows_at: torch.Tensor | None = None) -> None:
        """Add rows [R, P] (float64): to the dense blocks as Σ rowᵀrow, to the low-rank blocks as stored rows."""
        for b, cols in enumerate(self._block_slices()):
            if b in self.dense:
                part = rows[:, cols]
                self.dense[b] += part.T @ part
            else:
                self.rows[b][rows_at] = rows[:, cols]

    # -- damping and solves ------------------------------------------------------------------------------------
    def _set_damping(self) -> None:
        # 0.1 × the mean eigenvalue of each block: a layer's own with block_diagonal=True (as EK-FAC, DataInf and
        # LiSSA do, so a layer's λ does not depend on which other layers are tracked), else the whole G's
        for b, (block, size) in enumerate(zip(self.blocks, self.block_sizes)):
            matrix_trace = torch.diagonal(self.dense[b]).sum() if b in self.dense else self.rows[b].square().sum()
            trace = float(matrix_trace)
            for name in block:
                self.resolve_damping(name, 0.1 * trace / size)
        self._factorize()

    def _diagonal(self, block: list[str], device) -> torch.Tensor:
        """D_b: each parameter's λ, [P_b] float64."""
        return torch.cat([torch.full((self.layers[n].n_params,), self.damping_used[n], dtype=torch.float64)
                          for n in block]).to(device)

    def _factorize(self) -> None:
        self._solvers = {}
        for b, block in enumerate(self.blocks):
            if b in self.dense:
                matrix = self.dense[b] + torch.diag(self._diagonal(block, self.dense[b].device))
            else:
                rows, diagonal = self.rows[b], self._diagonal(block, self.rows[b].device)
                if not bool((diagonal > 0).all()):
                    raise InfkitError(
                        "the exact estimator's low-rank (Woodbury) form needs a damping > 0 for every layer; give a "
                        "positive damping= or damping=None for the heuristic"
                    )
                matrix = torch.eye(rows.shape[0], dtype=torch.float64, device=rows.device) + (rows / diagonal) @ rows.T
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info) != 0:
                raise InfkitError(
                    "the damped curvature G + λI is not positive definite (λ too small for a singular G); "
                    "give a positive damping= or use damping=None for the heuristic"
                )
            self._solvers[b] = factor

    def precondition(self, grads: Grads) -> Grads:
        out: Grads = {}
        for b, block in enumerate(self.blocks):
            flat = self.flatten(grads, block)
            v = flat.double().T  # [P_b, Q]
            if b in self.dense:
                solved = torch.cholesky_solve(v, self._solvers[b])
            else:
                rows, diagonal = self.rows[b], self._diagonal(block, v.device)[:, None]
                scaled = v / diagonal  # D⁻¹v
                solved = scaled - (rows.T / diagonal) @ torch.cholesky_solve(rows @ scaled, self._solvers[b])
            out.update({n: g.to(flat.dtype) for n, g in self.unflatten(solved.T, block).items()})
        return out

    @property
    def curvature(self) -> torch.Tensor:
        """G as one dense float64 matrix (zeros off the blocks), for inspection on small models."""
        full = torch.zeros(self.n_params, self.n_params, dtype=torch.float64)
        for b, cols in enumerate(self._block_slices()):
            block = self.dense[b] if b in self.dense else self.rows[b].T @ self.rows[b]
            full[cols, cols] = block.cpu()
        return full

    def state(self):
        state = {f"dense.{b}": g for b, g in self.dense.items()}
        state.update({f"rows.{b}": x for b, x in self.rows.items()})
        return state

    def load_state(self, state, damping_used) -> None:
        self.dense = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("dense.")}
        self.rows = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("rows.")}
        if len(self.dense) + len(self.rows) != len(self.blocks):
            raise InfkitError("the saved exact estimator has other blocks than this one (block_diagonal differs?); "
                              "load it with the options it was fitted with, or fit a new analysis")
        self.forms = ["dense" if b in self.dense else "lowrank" for b in range(len(self.blocks))]
        self.damping_used = dict(damping_used)
        self._factorize()

    def state_shapes(self, rows):
        if not self.forms:  # chosen by check_fits, at the analysis' construction
            return None
        shapes = {}
        for b, (form, size) in enumerate(zip(self.forms, self.block_sizes)):
            if form == "dense":
                shapes[f"dense.{b}"] = (size, size)
            else:
                shapes[f"rows.{b}"] = (rows, size)
        return shapes
