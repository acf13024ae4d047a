"""Exact reference: the dense damped Gauss-Newton matrix over all tracked parameters, solved in float64.

Note:
    With P tracked parameters and per-example gradients flattened layer by layer (each [d_out, d_in] row-major):

    * ``fisher="sampled"`` (default): the GGN itself, G = (1/n) Σ_i Σ_t J_tᵀ H_t J_t, H_t = ∂²ℓ/∂z_t² — the
      expectation of the sampled Fisher, computed without sampling. The task gives a root R_t (R_t R_tᵀ = H_t);
      each column of R_t, back-propagated from position t alone, yields one vector J_tᵀ R_t[:, c]; G sums their
      outer products. Cost: positions × classes backward passes per batch.
    * ``fisher="empirical"``: G = (1/n) Σ_i g_i g_iᵀ with the data's labels.

    (G + λI)⁻¹ is applied with a float64 Cholesky factor. λ: a float, a per-layer dict (a diagonal λ), or by
    default 0.1 · trace(G) / P (a tenth of the mean eigenvalue). ``block_diagonal=True`` keeps only the per-layer
    blocks, the reference for block-diagonal estimators. Memory P² float64: refused above ``max_params``.
"""

from __future__ import annotations

import torch

from infkit.capture import Capture, per_example_grads
from infkit.errors import InfkitError
from infkit.estimators.base import Estimator, Grads, register
from infkit.passes import eval_mode

DEFAULT_MAX_PARAMS = 20_000
ROWS_PER_UPDATE = 2048


@register("exact")
class Exact(Estimator):
    def __init__(self, layers, damping=None, block_diagonal: bool = False, max_params: int = DEFAULT_MAX_PARAMS):
        super().__init__(layers, damping)
        self.block_diagonal = block_diagonal
        self.n_params = sum(layer.n_params for layer in layers.values())
        if self.n_params > max_params:
            sizes = ", ".join(f"{n}: {layer.n_params}" for n, layer in list(layers.items())[:6])
            raise InfkitError(
                f"the exact estimator builds a dense {self.n_params} x {self.n_params} float64 matrix "
                f"({self.n_params**2 * 8 / 2**30:.1f} GiB), above its limit of {max_params} tracked parameters "
                f"(layers: {sizes}{', ...' if len(layers) > 6 else ''}). Track fewer layers with modules=, use a "
                "smaller LoRA rank, or raise max_params= if you have the memory"
            )
        self.curvature: torch.Tensor | None = None  # G [P, P] float64
        self._factor: torch.Tensor | None = None  # Cholesky factor of G + diag(λ)

    def planned_factor_bytes(self, n_train: int) -> int:
        return 2 * 8 * self.n_params**2  # G and its Cholesky factor, float64

    def flatten(self, grads: Grads) -> torch.Tensor:
        return torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in self.layers], dim=1)

    def unflatten(self, flat: torch.Tensor) -> Grads:
        out, start = {}, 0
        for name, layer in self.layers.items():
            out[name] = flat[:, start : start + layer.n_params].reshape(-1, layer.d_out, layer.d_in)
            start += layer.n_params
        return out

    def fit(self, passes) -> None:
        gram = torch.zeros(self.n_params, self.n_params, dtype=torch.float64, device=passes.device)
        if passes.fisher == "empirical":
            for cb in passes.iterate("true", desc="exact: empirical Fisher"):
                g = self.flatten({n: cb.grads(n) for n in self.layers}).double()
                gram += g.T @ g
        else:
            for indices in passes.batches(desc="exact: GGN"):
                self._accumulate_ggn(passes, indices, gram)
        gram /= passes.n
        if self.block_diagonal:
            gram = gram * self._block_mask(gram.device)
        self.curvature = gram
        self._set_damping()

    def _accumulate_ggn(self, passes, indices: list[int], gram: torch.Tensor) -> None:
        batch = passes.collate(indices)
        rows: list[torch.Tensor] = []
        with eval_mode(passes.model), torch.enable_grad(), Capture(self.layers, passes.task.token_mask(batch)) as cap:
            outputs, root = passes.task.output_hessian_root(passes.model, batch)  # [B, P, C], [B, P, C, C]
            activations = cap.activations()
            live_positions = root.detach().abs().flatten(2).sum(dim=(0, 2)).nonzero().flatten().tolist()
            for pos in live_positions:
                for col in range(root.shape[-1]):
                    seed = torch.zeros_like(outputs)
                    seed[:, pos, :] = root[:, pos, :, col]
                    s = cap.output_grads((outputs * seed).flatten(1).sum(dim=1), retain_graph=True)
                    rows.append(self.flatten({n: per_example_grads(activations[n], s[n]) for n in self.layers}))
                    if sum(r.shape[0] for r in rows) >= ROWS_PER_UPDATE:
                        stacked = torch.cat(rows).double()
                        gram += stacked.T @ stacked
                        rows.clear()
        if rows:
            stacked = torch.cat(rows).double()
            gram += stacked.T @ stacked

    def _block_mask(self, device) -> torch.Tensor:
        owner = torch.cat([torch.full((layer.n_params,), k) for k, layer in enumerate(self.layers.values())])
        return (owner[:, None] == owner[None, :]).to(device=device, dtype=torch.float64)

    def _set_damping(self) -> None:
        heuristic = 0.1 * float(torch.diagonal(self.curvature).mean())
        for name in self.layers:
            self.resolve_damping(name, heuristic)
        self._factorize()

    def _factorize(self) -> None:
        diagonal = torch.cat(
            [torch.full((layer.n_params,), self.damping_used[name], dtype=torch.float64)
             for name, layer in self.layers.items()]
        ).to(self.curvature.device)
        factor, info = torch.linalg.cholesky_ex(self.curvature + torch.diag(diagonal))
        if int(info) != 0:
            raise InfkitError(
                "the damped curvature G + λI is not positive definite (λ too small for a singular G); "
                "give a positive damping= or use damping=None for the heuristic"
            )
        self._factor = factor

    def precondition(self, grads: Grads) -> Grads:
        flat = self.flatten(grads)
        solved = torch.cholesky_solve(flat.double().T, self._factor).T
        return {n: g.to(flat.dtype) for n, g in self.unflatten(solved).items()}

    def state(self):
        return {"curvature": self.curvature}

    def load_state(self, state, damping_used) -> None:
        self.curvature = state["curvature"]
        self.damping_used = dict(damping_used)
        self._factorize()
