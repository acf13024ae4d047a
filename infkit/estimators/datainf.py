"""DataInf (Kwon et al. 2023): a closed-form inverse of each layer's damped Fisher, built for LoRA adapters.

Note:
    Per tracked layer l (a LoRA A or B matrix, or any tracked linear map) with d_l parameters, and the n
    per-example Fisher gradients g_il ∈ R^{d_l} (labels drawn from the model, or the data's with
    ``fisher="empirical"``), G_l = (1/n) Σ_i g_il g_ilᵀ. DataInf swaps the order of inverse and mean:

        (G_l + λ_l I)⁻¹ ≈ (1/n) Σ_i (g_il g_ilᵀ + λ_l I)⁻¹
                        = (1/(n λ_l)) Σ_i (I − g_il g_ilᵀ / (λ_l + ‖g_il‖²))      (Sherman-Morrison)

    With the stacked gradients Γ_l [n, d_l], their squared norms ν_l [n] and queries V [Q, d_l]:

        C = (V Γ_lᵀ) ⊘ (λ_l + ν_l)          [Q, n]
        (G_l + λ_l I)⁻¹ V ≈ (V − (1/n) C Γ_l) / λ_l

    — two matrix products per layer for all queries at once. λ_l = 0.1 · (1/(n d_l)) Σ_i ‖g_il‖² by default (a
    tenth of the mean eigenvalue of G_l, as for EK-FAC), or the user's ``damping=``.

    Cost: one pass over the train data; memory n · d_l per layer (the stacked gradients, float32, or float64 for
    a float64 model); a query batch costs O(Q · n · d_l) per layer. The swap of inverse and mean is exact when
    every g_il is the same and its error grows with d_l, so DataInf is meant for the small blocks of LoRA
    adapters (d_l = r · d_in or d_out · r); on a model without LoRA adapters it works on whatever is tracked, with
    a warning.
"""

from __future__ import annotations

import warnings

import torch

from infkit.capture import is_lora_layer
from infkit.errors import InfkitError
from infkit.estimators.base import Estimator, Grads, Side, register
from infkit.tasks.base import Labels

#: λ_l = DAMPING_FRACTION · mean squared per-example gradient norm / d_l (Kwon et al. 2023).
DAMPING_FRACTION = 0.1


def stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """Stacked gradients are kept in float64 for float64 models, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stacked_gradients(passes, layers, desc: str, projections=None) -> dict[str, torch.Tensor]:
    """Every train example's gradient of each layer under the curvature's labels, flattened and stacked:
    {layer: [n, d_l]}, or {layer: [n, k_out·k_in]} projected when ``projections`` are given (formed from the tokens,
    never in full); float32, or float64 for a float64 model; one pass."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for cb in passes.iterate(Labels.CURVATURE, desc=desc):
        for name in layers:
            a, s = cb.activations[name], cb.output_grads[name]
            g = projections[name].of_tokens(a, s) if projections else cb.grads(name)
            parts[name].append(g.reshape(g.shape[0], -1).to(stored_dtype(g.dtype)))
    return {name: torch.cat(parts.pop(name)) for name in list(parts)}  # free the pieces as we go


def no_lora_warning(layers, estimator: str) -> None:
    """Warn when none of the tracked layers is a LoRA matrix: the estimator is meant for small blocks."""
    if any(is_lora_layer(name) for name in layers):
        return
    total = sum(layer.n_params for layer in layers.values())
    largest = max(layers.values(), key=lambda layer: layer.n_params)
    warnings.warn(
        f"{estimator} is designed for LoRA adapters with small per-layer dimensions, but the model has no LoRA "
        f"adapters: it tracks {total:,} parameters in {len(layers)} layers (largest: {largest.name}, "
        f"{largest.d_out} x {largest.d_in} = {largest.n_params:,} parameters). Its approximation error grows with "
        "the layer size; add a LoRA adapter (peft) or prefer estimator='ekfac' for whole layers",
        stacklevel=4,
    )


@register("datainf")
class DataInf(Estimator):
    default_fisher = "empirical"
    fisher_reason = "the empirical Fisher, the data's labels, one pass (Kwon et al. 2023)"
    def __init__(self, layers, damping=None):
        super().__init__(layers, damping)
        no_lora_warning(layers, "datainf")
        self.gradients: dict[str, torch.Tensor] = {}  # Γ_l [n, d_l]
        self.squared_norms: dict[str, torch.Tensor] = {}  # ν_l [n]
        self.n_examples = 0

    def planned_factor_bytes(self, n_train: int) -> int:
        total = 0
        for name, layer in self.layers.items():
            element = 8 if layer.module.weight.dtype == torch.float64 else 4
            k_out, k_in = (self.projected_shapes or {}).get(name, (layer.d_out, layer.d_in))
            total += element * n_train * (k_out * k_in + 1)
        return total

    # A projected store: seeded Gaussian projections ĝ = P_out g P_inᵀ, and the formula runs on them as if they were
    # the gradients (E‖ĝ‖² = ‖g‖², so λ = 0.1 · mean ‖ĝ‖² / d_l, d_l the layer's full size, estimates the full λ).
    projection_kind = "random"
    preconditions_with_all_ranks = True  # (V − (1/n) C Γ) / λ sums over the stored gradients of every rank

    def fit(self, passes, keep=None):
        projections = self.projections if self.projected_shapes is not None else None
        world = passes.world  # several processes: each rank keeps its shard's rows; sums go over all ranks
        for name, stacked in stacked_gradients(passes, self.layers, "datainf: per-example gradients",
                                               projections).items():
            layer = self.layers[name]
            norms = stacked.square().sum(dim=1)
            self.gradients[name], self.squared_norms[name] = stacked, norms
            rows = world.sum_number(norms.shape[0], "count examples")
            heuristic = DAMPING_FRACTION * world.sum_number(float(norms.double().sum()), "sum norms") / rows
            self.resolve_damping(name, heuristic / layer.n_params)
        # n (times fisher_samples draws), over all ranks
        self.n_examples = int(world.sum_number(next(iter(self.gradients.values())).shape[0], "count examples"))
        self.check_damping()
        if keep is None or passes.fisher != "empirical":
            return self.fitted()
        for name, store in keep.items():  # the stacked gradients are the train gradients, the raw train side
            store.copy_(self.gradients[name].reshape(store.shape).to(store.dtype))
        return self.fitted(train_side=keep)

    # Queries are preconditioned (as in the paper's code): O(Q · n · d_l) per layer for Q queries, against
    # O(n² · d_l) once to precondition every train gradient, which at n in the thousands costs seconds per layer.
    preconditions = Side.QUERY

    def fills_train_side(self, fisher: str) -> bool:
        return fisher == "empirical"  # the stacked gradients are then the train gradients

    def check_damping(self) -> None:
        for name, lam in self.damping_used.items():
            if not lam > 0:
                raise InfkitError(
                    f"{self.name} needs a damping > 0 (its formula divides by λ), but layer {name!r} has λ = {lam}"
                    " (a zero gradient everywhere gives a zero heuristic: is the layer trained, e.g. LoRA B != 0?)"
                )

    def precondition(self, grads: Grads) -> Grads:
        if self.projected_shapes is not None:
            raise InfkitError("this DataInf fit keeps projected gradients only: precondition through "
                              "query_preconditioned(), which works in the projected space")
        return self._apply(grads)

    def finish_projected_query(self, projected):
        return self._apply(projected)

    def _apply(self, grads: Grads) -> Grads:
        """(V − (1/n) C Γ) / λ per layer, with Γ the stacked (full or projected) gradients; same layout out."""
        out = {}
        for name, v in grads.items():
            stacked, norms = self.gradients[name], self.squared_norms[name]
            lam = self.damping_used[name]
            flat = v.flatten(1).to(device=stacked.device, dtype=stacked.dtype)
            coefficients = (flat @ stacked.T) / (lam + norms)  # [Q, n] (this rank's rows)
            correction = self.world.sum(coefficients @ stacked, "DataInf query products")  # Σ over all n rows
            solved = (flat - correction / self.n_examples) / lam
            out[name] = solved.reshape(v.shape).to(device=v.device, dtype=v.dtype)
        return out

    def state(self):
        tensors = {}
        for name in self.layers:
            tensors[f"{name}/gradients"] = self.gradients[name]
            tensors[f"{name}/squared_norms"] = self.squared_norms[name]
        return tensors

    def load_state(self, state, damping_used) -> None:
        for name in self.layers:
            self.gradients[name] = state[f"{name}/gradients"]
            self.squared_norms[name] = state[f"{name}/squared_norms"]
        self.n_examples = int(self.world.sum_number(next(iter(self.gradients.values())).shape[0], "count examples"))
        self.damping_used = dict(damping_used)
        self.check_damping()

    def state_shapes(self, rows):
        shapes = {}
        for name, layer in self.layers.items():
            k_out, k_in = (self.projected_shapes or {}).get(name, (layer.d_out, layer.d_in))
            shapes[f"{name}/gradients"] = (rows, k_out * k_in)
            shapes[f"{name}/squared_norms"] = (rows,)
        return shapes
