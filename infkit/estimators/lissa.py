"""LiSSA (Agarwal et al. 2017; Koh & Liang 2017): (G + λI)⁻¹ v by a stochastic Neumann recursion.

Note:
    H = G + Λ with G = (1/n) Σ_i g_i g_iᵀ over the per-example Fisher gradients g_i ∈ R^P of all tracked layers
    (labels drawn from the model, or the data's with ``fisher="empirical"``) and Λ = diag(λ_l) per layer. With a
    positive scale s_l per layer (S = diag(s_l)), depth J and h_0 = S⁻¹ v:

        h_j = S⁻¹ v + h_{j−1} − S⁻¹ (G_B h_{j−1} + Λ h_{j−1}),     G_B x = (1/|B|) Σ_{i∈B} g_i (g_iᵀ x)

    with a fresh random mini-batch B of the stored gradients at every step. Its fixed point is h = H⁻¹ v (for a
    single scale this is the usual "h_j = v + (I − H/s) h_{j−1}, return h_J / s"); it converges, geometrically at
    rate 1 − λ/s per step, when every s_l exceeds the largest eigenvalue of H (of its block l with
    ``block_diagonal=True``). The result is the mean over ``repeats`` independent recursions.

    Defaults: ``depth=500`` steps, ``repeats=2``, ``minibatch=32`` examples per step (all n when n is smaller),
    damping λ_l = 0.1 · (1/(n d_l)) Σ_i ‖g_il‖² per layer (a tenth of the mean eigenvalue of the layer's block, as
    for DataInf and EK-FAC; a float or dict overrides it), and ``scale=None``: 1.5 × (the largest eigenvalue of
    G + Λ, estimated by 30 power iterations on the full G at fit time), raised where needed to 0.6 × a bound on the
    largest eigenvalue of any mini-batch's G_B + Λ (the mean of the ``minibatch`` largest ‖g_i‖², plus λ): every
    step is then a contraction, so a batch of unusually large gradients cannot make the recursion diverge. Per
    layer with ``block_diagonal=True``, one for the whole model otherwise; a float ``scale=`` sets every layer's.
    ``block_diagonal=False`` (default) inverts G over all tracked parameters jointly; ``True`` drops the
    cross-layer terms (the reference of DataInf, EK-FAC and the block-diagonal "exact"). Randomness: the
    mini-batches are drawn from a generator seeded by the analysis' ``seed`` at each call, so a query's result
    does not depend on the other queries in its batch.

    Cost: one pass over the train data to store the n × P gradients (float32, or float64 for a float64 model);
    each query batch costs depth × repeats mini-batch products, O(depth · repeats · Q · minibatch · P). With
    ``block_diagonal=True`` the layers of equal size are stacked and their products batched (``torch.bmm``), so
    a step is a few large matrix products rather than two per layer. The number of steps it needs grows with s/λ
    (the condition number of H), so with little damping or a spread-out spectrum the default depth leaves it short
    of convergence: compare it with "exact" on a small model first.
"""

from __future__ import annotations

import torch

from infkit.errors import InfkitError
from infkit.estimators.base import Estimator, Grads, register
from infkit.estimators.datainf import DAMPING_FRACTION, stacked_gradients

POWER_ITERATIONS = 30
SCALE_MARGIN = 1.5
#: every step's map I − (G_B + Λ)/s is a contraction when s > λ_max(G_B + Λ)/2 for all mini-batches B; the scale
#: is kept above STABILITY_MARGIN × a bound on that eigenvalue, so an unlucky mini-batch cannot make it diverge.
STABILITY_MARGIN = 0.6


@register("lissa")
class LiSSA(Estimator):
    default_fisher = "empirical"
    fisher_reason = "the empirical Fisher, the data's labels (Koh & Liang 2017; Kwon et al. 2023)"
    def __init__(
        self,
        layers,
        damping=None,
        depth: int = 500,
        repeats: int = 2,
        minibatch: int = 32,
        scale: float | None = None,
        block_diagonal: bool = False,
    ):
        super().__init__(layers, damping)
        for label, value in (("depth", depth), ("repeats", repeats), ("minibatch", minibatch)):
            if int(value) < 1:
                raise InfkitError(f"lissa: {label} must be >= 1, got {value}")
        if scale is not None and not scale > 0:
            raise InfkitError(f"lissa: scale must be > 0 (above the largest eigenvalue of G + λI), got {scale}")
        self.depth, self.repeats, self.minibatch = int(depth), int(repeats), int(minibatch)
        self.scale_option, self.block_diagonal = scale, block_diagonal
        self.n_params = sum(layer.n_params for layer in layers.values())
        # Groups of layers whose blocks are handled together: every layer in one group (joint, the rows are the
        # concatenated gradients), or, block-diagonal, the layers of one size stacked as [L_g, n, d].
        if block_diagonal:
            sizes: dict[int, list[str]] = {}
            for name, layer in layers.items():
                sizes.setdefault(layer.n_params, []).append(name)
            self.groups = list(sizes.values())
        else:
            self.groups = [list(layers)]
        self.stacks: list[torch.Tensor] = []  # per group [L_g, n, d_g] (joint: [1, n, P])
        self.scales: dict[str, float] = {}
        self.power_iteration_top: dict[str, float] = {}  # largest eigenvalue of G + Λ per layer (power iteration)
        self.seed = 0

    def fills_train_side(self, fisher: str) -> bool:
        return fisher == "empirical"  # the stored Fisher gradients are then the train gradients, the train side

    def planned_factor_bytes(self, n_train: int) -> int:
        element = 8 if next(iter(self.layers.values())).module.weight.dtype == torch.float64 else 4
        return element * n_train * self.n_params

    # -- layout -------------------------------------------------------------------------------------------------
    def _to_groups(self, flat: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """{layer: [m, d_l]} -> per group [L_g, m, d_g] (joint: the layers concatenated, [1, m, P])."""
        if not self.block_diagonal:
            return [torch.cat([flat[name] for name in self.groups[0]], dim=1)[None]]
        return [torch.stack([flat[name] for name in group]) for group in self.groups]

    def _from_groups(self, stacked: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        if not self.block_diagonal:
            start = 0
            for name in self.groups[0]:
                size = self.layers[name].n_params
                out[name] = stacked[0][0, :, start : start + size]
                start += size
            return out
        for group, tensor in zip(self.groups, stacked):
            for k, name in enumerate(group):
                out[name] = tensor[k]
        return out

    def _per_entry(self, values: dict[str, float], like: list[torch.Tensor]) -> list[torch.Tensor]:
        """A per-layer number laid out like the groups: [L_g, 1, d_g]."""
        full = {name: torch.full((1, layer.n_params), values[name]) for name, layer in self.layers.items()}
        return [t.to(device=ref.device, dtype=ref.dtype) for t, ref in zip(self._to_groups(full), like)]

    @staticmethod
    def _product(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """G_rows x per block: x [L, Q, d], rows [L, B, d] -> (1/B) Σ_i g_i (g_iᵀ x), [L, Q, d]."""
        return torch.bmm(torch.bmm(x, rows.transpose(1, 2)), rows) / rows.shape[1]

    # -- fit ----------------------------------------------------------------------------------------------------
    def fit(self, passes, keep=None):
        flat = stacked_gradients(passes, self.layers, "lissa: per-example gradients")
        if keep is not None and passes.fisher == "empirical":  # these are the train gradients
            for name, store in keep.items():
                store.copy_(flat[name].reshape(store.shape).to(store.dtype))
        else:
            keep = None
        # several processes: the recursion draws mini-batches from every example, so each rank holds all rows
        flat = {name: passes.world.gather_rows(g, "gather LiSSA gradients") for name, g in flat.items()}
        for name, g in flat.items():  # rows: n examples (times fisher_samples draws)
            self.resolve_damping(name, DAMPING_FRACTION * float(g.double().square().mean()))
        self.stacks = self._to_groups(flat)
        del flat
        self.seed = passes.seed
        self._set_scales()
        return self.fitted(train_side=keep)

    def _set_scales(self) -> None:
        if self.scale_option is not None:
            self.scales = {name: float(self.scale_option) for name in self.layers}
            return
        # Power iteration on G + Λ with the full G (every block at once), from a seeded random start.
        damping = self._per_entry(self.damping_used, self.stacks)
        generator = torch.Generator().manual_seed(self.seed)
        xs = [torch.randn(t.shape[0], 1, t.shape[2], generator=generator, dtype=t.dtype).to(t.device)
              for t in self.stacks]
        tops = [None] * len(xs)
        for _ in range(POWER_ITERATIONS):
            for k, (stack, lam) in enumerate(zip(self.stacks, damping)):
                x = xs[k] / xs[k].norm(dim=2, keepdim=True).clamp_min(1e-300)
                y = self._product(x, stack) + lam * x
                tops[k] = (x * y).sum(dim=(1, 2))  # Rayleigh quotient per block [L_g]
                xs[k] = y
        top = self._per_layer(tops)
        self.power_iteration_top = top
        bound = self._batch_eigenvalue_bound()
        self.scales = {name: max(SCALE_MARGIN * top[name], STABILITY_MARGIN * bound[name]) for name in top}
        for name, value in self.scales.items():
            if not value > 0:
                raise InfkitError(
                    f"lissa: the curvature of layer {name!r} is zero (largest eigenvalue {value / SCALE_MARGIN}); "
                    "give a positive damping= or scale="
                )

    def _batch_eigenvalue_bound(self) -> dict[str, float]:
        """Per layer, an upper bound on the largest eigenvalue of G_B + Λ over every mini-batch B the recursion
        can draw: λ_max(G_B) ≤ trace(G_B) = mean_{i∈B} ‖g_i‖² ≤ the mean of the |B| largest ‖g_i‖²."""
        batch = min(self.minibatch, self.stacks[0].shape[1])
        per_group = [stack.double().square().sum(dim=2).topk(batch, dim=1).values.mean(dim=1) for stack in self.stacks]
        return {name: value + self.damping_used[name] for name, value in self._per_layer(per_group).items()}

    def _per_layer(self, per_group: list[torch.Tensor]) -> dict[str, float]:
        """One number per block ([L_g] per group) -> {layer: number}; joint, the single block's for every layer."""
        if not self.block_diagonal:
            return dict.fromkeys(self.layers, float(per_group[0][0]))
        return {name: value for group, values in zip(self.groups, per_group)
                for name, value in zip(group, values.tolist())}

    # -- precondition -------------------------------------------------------------------------------------------
    def precondition(self, grads: Grads) -> Grads:
        ref = self.stacks[0]
        flat = {name: grads[name].reshape(grads[name].shape[0], -1).to(device=ref.device, dtype=ref.dtype)
                for name in self.layers}
        v = self._to_groups(flat)
        damping = self._per_entry(self.damping_used, self.stacks)
        inv_scale = self._per_entry({name: 1.0 / s for name, s in self.scales.items()}, self.stacks)
        n = ref.shape[1]
        batch = min(self.minibatch, n)
        generator = torch.Generator().manual_seed(self.seed)
        start = [x * c for x, c in zip(v, inv_scale)]
        total = [torch.zeros_like(x) for x in v]
        for _ in range(self.repeats):
            h = [x.clone() for x in start]
            for _ in range(self.depth):
                index = torch.randperm(n, generator=generator)[:batch].to(ref.device)
                for k, stack in enumerate(self.stacks):
                    product = self._product(h[k], stack[:, index]) + damping[k] * h[k]
                    h[k] = start[k] + h[k] - inv_scale[k] * product
            for k in range(len(total)):
                total[k] += h[k]
        solved = self._from_groups([t / self.repeats for t in total])
        return {name: solved[name].reshape(grads[name].shape).to(device=grads[name].device, dtype=grads[name].dtype)
                for name in self.layers}

    def state(self):
        tensors = {f"{name}/gradients": g for name, g in self._from_groups(self.stacks).items()}
        tensors["scales"] = torch.tensor([self.scales[name] for name in self.layers], dtype=torch.float64)
        tensors["seed"] = torch.tensor(self.seed)
        return tensors

    def load_state(self, state, damping_used) -> None:
        self.stacks = self._to_groups({name: state[f"{name}/gradients"] for name in self.layers})
        self.scales = {name: float(s) for name, s in zip(self.layers, state["scales"])}
        self.seed = int(state["seed"])
        self.damping_used = dict(damping_used)

    def state_shapes(self, rows):
        shapes = {f"{name}/gradients": (rows, layer.n_params) for name, layer in self.layers.items()}
        return {**shapes, "scales": (len(self.layers),), "seed": ()}
