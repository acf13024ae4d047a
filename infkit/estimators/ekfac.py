"""EK-FAC (George et al. 2018; Grosse et al. 2023): Kronecker eigenbases with corrected eigenvalues.

Note:
    Per layer with inputs a ∈ R^{d_in} (a 1 appended for the bias) and output gradients s ∈ R^{d_out}, from a pass
    with labels drawn from the model (or the data's, ``fisher="empirical"``):

    * A = E_tokens[a aᵀ] = Q_A diag(λ_A) Q_Aᵀ,  S = E_tokens[s sᵀ] = Q_S diag(λ_S) Q_Sᵀ  (eigh in float64);
    * corrected eigenvalues Λ[i, j] = E_examples[(Q_Sᵀ ΣW Q_A)[i, j]²]  [d_out, d_in], a second pass;
    * (G + λI)⁻¹ V = Q_S ((Q_Sᵀ V Q_A) ⊘ (Λ + λ)) Q_Aᵀ, with λ = 0.1 · mean(Λ) by default.

    Cost: two passes over the train data; memory d_in² + d_out² + d_in·d_out per layer; a query's
    preconditioning is four matmuls per layer.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from infkit.errors import InfkitError
from infkit.estimators.base import Estimator, Grads, Side, register
from infkit.projection import PairProjection, kept_share, leading_pairs
from infkit.tasks.base import Labels

#: The damping heuristic of Grosse et al. 2023: a tenth of the mean eigenvalue of each layer's block.
DAMPING_FRACTION = 0.1
#: The largest side of a Kronecker factor (A is d_in x d_in, S is d_out x d_out) accepted by default: 16384 is
#: 2 GiB per float64 matrix, held twice (covariance and eigenvectors) plus the eigendecomposition's workspace.
MAX_FACTOR_DIM = 16384


def divide_rows(stored: torch.Tensor, denominator: torch.Tensor, chunk: int = 4096) -> None:
    """stored[i] /= denominator for every row, in place, a chunk of rows at a time (the store may be a memory map
    on disk: no full-size temporary)."""
    for start in range(0, stored.shape[0], chunk):
        stored[start : start + chunk] /= denominator.to(device=stored.device, dtype=stored.dtype)


class KroneckerEigenbasis(Estimator):
    """Shared machinery of K-FAC and EK-FAC: eigenbases Q_A, Q_S and an eigenvalue matrix Λ per layer."""

    # A projected store keeps the leading eigen-directions of S and A: the preconditioner stays diagonal there.
    projection_kind = "eigenbasis"

    def __init__(self, layers, damping=None, max_factor_dim: int = MAX_FACTOR_DIM):
        super().__init__(layers, damping)
        self.check_factor_sizes(int(max_factor_dim))
        self.activation_cov: dict[str, torch.Tensor] = {}  # A [d_in, d_in] float64
        self.gradient_cov: dict[str, torch.Tensor] = {}  # S [d_out, d_out] float64
        self.eigvecs_a: dict[str, torch.Tensor] = {}
        self.eigvecs_s: dict[str, torch.Tensor] = {}
        self.eigvals_a: dict[str, torch.Tensor] = {}
        self.eigvals_s: dict[str, torch.Tensor] = {}
        self.eigenvalues: dict[str, torch.Tensor] = {}  # Λ [d_out, d_in]
        self.mean_tokens: dict[str, float] = {}  # T̄: real positions per example
        self.n_examples = 0
        # with a projected store: the kept eigen-pairs per layer, (rows of Λ [m], columns of Λ [m]), i.e. the
        # S and A eigenvector of each pair
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept_shares: dict[str, float] = {}  # share of Σ Λ/(Λ+λ) the kept pairs hold (projection.kept_share)

    def check_factor_sizes(self, limit: int) -> None:
        """Refuse at construction a layer whose factor would not fit, naming its size and how to leave it out."""
        for layer in self.layers.values():
            side, factor = max((layer.d_in, "input factor A"), (layer.d_out, "output-gradient factor S"))
            if side > limit:
                gib = 2 * 8 * side**2 / 2**30
                raise InfkitError(
                    f"layer {layer.name!r} ({layer.d_out} x {layer.d_in}) has a {side} x {side} {factor}: "
                    f"{gib:.1f} GiB in float64 (covariance and eigenvectors), above {self.name}'s limit of "
                    f"{limit} per side. Leave it out with modules= (a pattern that does not match it), or raise "
                    "max_factor_dim= if you have the memory"
                )

    def fit_kronecker_factors(self, passes) -> None:
        """Pass 1: A, S (token averages) and T̄, then their float64 eigendecompositions."""
        world = passes.world
        sum_aa = {n: torch.zeros(l.d_in, l.d_in, dtype=torch.float64, device=passes.device)
                  for n, l in self.layers.items()}
        sum_ss = {n: torch.zeros(l.d_out, l.d_out, dtype=torch.float64, device=passes.device)
                  for n, l in self.layers.items()}
        tokens = dict.fromkeys(self.layers, 0)
        n_examples = 0
        for cb in passes.iterate(Labels.CURVATURE, desc=f"{self.name}: covariances"):
            n_examples += len(cb.indices)
            for name in self.layers:
                a = cb.activations[name].reshape(-1, cb.activations[name].shape[-1])
                s = cb.output_grads[name].reshape(-1, cb.output_grads[name].shape[-1])
                sum_aa[name] += (a.T @ a).double()
                sum_ss[name] += (s.T @ s).double()
                tokens[name] += cb.token_counts[name]
        # several processes: each rank summed its shard; the sums over all ranks are one process' sums
        counts = world.sum(torch.tensor([n_examples, *tokens.values()], dtype=torch.float64, device=world.device),
                           "count examples")
        n_examples, tokens = int(counts[0]), dict(zip(self.layers, counts[1:].tolist()))
        self.n_examples = n_examples
        bar = tqdm(self.layers, desc=f"{self.name}: eigendecompositions", disable=not passes.progress, leave=False,
                   unit="layer")
        for name in bar:
            count = max(tokens[name], 1)
            self.activation_cov[name] = world.sum(sum_aa[name], "sum covariances") / count
            self.gradient_cov[name] = world.sum(sum_ss[name], "sum covariances") / count
            self.mean_tokens[name] = tokens[name] / n_examples
            self.eigvals_a[name], self.eigvecs_a[name] = torch.linalg.eigh(self.activation_cov[name])
            self.eigvals_s[name], self.eigvecs_s[name] = torch.linalg.eigh(self.gradient_cov[name])
            for basis in (self.eigvals_a, self.eigvecs_a, self.eigvals_s, self.eigvecs_s):
                world.broadcast(basis[name], "share eigenbases")  # rank 0's: the same bits on every rank
        if self.projected_shapes is not None:
            self.choose_projection()

    def choose_projection(self) -> None:
        """Keep the eigen-pairs with the largest K-FAC eigenvalue T̄·λ_S,i·λ_A,j across all layers, as many as the
        planned (k_out, k_in) shapes hold in all (at least one per layer: :func:`infkit.projection.leading_pairs`);
        each layer's store is then [1, m_layer]."""
        budget = sum(k_out * k_in for k_out, k_in in self.projected_shapes.values())
        values = {name: self.mean_tokens[name] * torch.outer(self.eigvals_s[name].clamp(min=0),
                                                             self.eigvals_a[name].clamp(min=0))
                  for name in self.projected_shapes}
        self.kept = leading_pairs(values, budget)
        self.build_pair_projections()

    def build_pair_projections(self) -> None:
        """The projections and store shapes of the kept pairs (after choosing them, or loading them)."""
        self.projections = {name: PairProjection.of_pairs(self.eigvecs_s[name], self.eigvecs_a[name], rows, columns)
                            for name, (rows, columns) in self.kept.items()}
        self.projected_shapes = {name: projection.shape for name, projection in self.projections.items()}

    def planned_factor_bytes(self, n_train: int) -> int:
        # float64: A, S, their eigenvectors, their eigenvalues, and Λ
        return 8 * sum(2 * (l.d_in**2 + l.d_out**2) + l.d_in + l.d_out + l.d_in * l.d_out for l in self.layers.values())

    def rotate(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """Q_Sᵀ V Q_A for a stack of gradients V [Q, d_out, d_in]."""
        q_s, q_a = self.eigvecs_s[name], self.eigvecs_a[name]
        return q_s.T.to(grads.dtype) @ grads @ q_a.to(grads.dtype)

    def unrotate(self, name: str, rotated: torch.Tensor) -> torch.Tensor:
        q_s, q_a = self.eigvecs_s[name], self.eigvecs_a[name]
        return q_s.to(rotated.dtype) @ rotated @ q_a.T.to(rotated.dtype)

    def set_damping(self) -> None:
        for name, eigenvalues in self.eigenvalues.items():
            lam = self.resolve_damping(name, DAMPING_FRACTION * float(eigenvalues.mean()))
            self.check_invertible(name, eigenvalues, lam)
            if name in self.kept:
                self.kept_shares[name] = kept_share(eigenvalues, lam, *self.kept[name])

    def check_invertible(self, name: str, eigenvalues: torch.Tensor, lam: float) -> None:
        """Refuse a damping that leaves Λ + λ with zeros (a singular block: (G + λI)⁻¹ would be inf, scores NaN).

        Λ has exact zeros (up to rounding) where the curvature is singular: an input that is always 0 (a blank
        pixel, a dead unit), output gradients confined to a subspace (those of a softmax's logits sum to 0).
        "Zero" is relative: below 1e-12 of the largest."""
        tiny = 1e-12 * max(float(eigenvalues.max()), 0.0)
        singular = int((eigenvalues + lam <= tiny).sum())
        if singular:
            raise InfkitError(
                f"layer {name!r}: with damping λ = {lam:g}, {singular} of its {eigenvalues.numel()} curvature "
                "eigenvalues Λ + λ are 0 (the curvature is singular: some inputs are always 0, or the output "
                "gradients span fewer directions than the outputs — a softmax's sum to 0), so (G + λI)⁻¹ does not "
                "exist and every score would be NaN. Give a damping > 0 for it (damping=None uses the heuristic, "
                "a tenth of its mean eigenvalue)"
            )

    def precondition(self, grads: Grads) -> Grads:
        out = {}
        for name, v in grads.items():
            v64 = v.double()
            denom = self.eigenvalues[name] + self.damping_used[name]
            out[name] = self.unrotate(name, self.rotate(name, v64) / denom).to(v.dtype)
        return out

    # Scores in the eigenbasis: ⟨Q_Sᵀ Vq Q_A, (Q_Sᵀ ΣW Q_A) ⊘ (Λ + λ)⟩ = ⟨Vq, (G + λI)⁻¹ ΣW⟩, since the rotation is
    # orthogonal. The train side (rotated, divided) is computed once and cached; a query only needs rotating.
    preconditions = Side.TRAIN

    def query_side(self, grads: Grads) -> Grads:
        return {name: self.rotate(name, v.double()).to(v.dtype) for name, v in grads.items()}

    def train_side(self, grads: Grads) -> Grads:
        return {name: self.rotate(name, g) / self._denominator(name, g.dtype) for name, g in grads.items()}

    def train_side_batch(self, cb) -> Grads:
        # Rotate the tokens' a and s first, then combine: B·T·(d_in² + d_out²) + B·T·d_out·d_in flops instead of
        # rotating each example's d_out × d_in gradient (B·(d_out²·d_in + d_out·d_in²)).
        return {name: self._rotated_grads(cb, name) / self._denominator(name, cb.activations[name].dtype)
                for name in self.layers}

    def _rotated_grads(self, cb, name: str) -> torch.Tensor:
        """Q_Sᵀ ΣW Q_A of each example of a captured batch, [B, d_out, d_in], in the model's dtype."""
        a, s = cb.activations[name], cb.output_grads[name]
        a_rot = a @ self.eigvecs_a[name].to(a.dtype)
        s_rot = s @ self.eigvecs_s[name].to(s.dtype)
        return torch.einsum("bto,bti->boi", s_rot, a_rot)

    def _denominator(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return (self.eigenvalues[name] + self.damping_used[name]).to(dtype)

    # -- the projected store: the kept eigen-pairs only ---------------------------------------------------------
    def _kept_denominator(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Λ + λ of the kept pairs, [1, m]."""
        rows, columns = self.kept[name]
        return (self.eigenvalues[name] + self.damping_used[name])[rows, columns].unsqueeze(0).to(like)

    def restrict(self, name: str, rotated: torch.Tensor) -> torch.Tensor:
        """The kept eigen-pairs of rotated gradients Q_Sᵀ G Q_A [B, d_out, d_in] -> [B, 1, m]."""
        rows, columns = self.kept[name]
        return rotated[:, rows.to(rotated.device), columns.to(rotated.device)].unsqueeze(1)

    def finish_projected_train(self, projected):
        return {name: g / self._kept_denominator(name, g) for name, g in projected.items()}

    def projected_self_influence(self, stored):
        # stored rows are ĝ ⊘ (Λ + λ) on the kept pairs: ĝᵀ (Λ + λ)⁻¹ ĝ = Σ stored² · (Λ + λ)
        return sum((stored[name].double().square() * self._kept_denominator(name, stored[name]).double())
                   .flatten(1).sum(dim=1) for name in stored)

    # A save holds the kept pairs only: their projections are columns of the saved eigenvectors.
    def projection_state(self):
        tensors = {}
        for name, (rows, columns) in self.kept.items():
            tensors[f"{name}/kept_out"], tensors[f"{name}/kept_in"] = rows, columns
        return tensors

    def load_projection_state(self, state):
        if self.projected_shapes is not None:
            self.kept = {name: (state[f"{name}/kept_out"], state[f"{name}/kept_in"]) for name in self.layers}
            self.build_pair_projections()

    def projection_state_shapes(self):
        shapes = {}
        for name, (_, m) in (self.projected_shapes or {}).items():
            shapes[f"{name}/kept_out"], shapes[f"{name}/kept_in"] = (m,), (m,)
        return shapes

    def state(self):
        tensors = {}
        for name in self.layers:
            tensors[f"{name}/eigvecs_a"] = self.eigvecs_a[name]
            tensors[f"{name}/eigvecs_s"] = self.eigvecs_s[name]
            tensors[f"{name}/eigenvalues"] = self.eigenvalues[name]
        return tensors

    def load_state(self, state, damping_used) -> None:
        for name in self.layers:
            self.eigvecs_a[name] = state[f"{name}/eigvecs_a"]
            self.eigvecs_s[name] = state[f"{name}/eigvecs_s"]
            self.eigenvalues[name] = state[f"{name}/eigenvalues"]
        self.damping_used = dict(damping_used)

    def state_shapes(self, rows):
        shapes = {}
        for name, layer in self.layers.items():
            shapes[f"{name}/eigvecs_a"] = (layer.d_in, layer.d_in)
            shapes[f"{name}/eigvecs_s"] = (layer.d_out, layer.d_out)
            shapes[f"{name}/eigenvalues"] = (layer.d_out, layer.d_in)
        return shapes


@register("ekfac")
class EKFAC(KroneckerEigenbasis):
    fit_passes = 2

    def fills_train_side(self, fisher: str) -> bool:
        return fisher == "empirical"

    def fit(self, passes, keep=None):
        self.fit_kronecker_factors(passes)
        sums = {n: torch.zeros(l.d_out, l.d_in, dtype=torch.float64, device=passes.device)
                for n, l in self.layers.items()}
        # With the empirical Fisher the correction pass sees the very gradients the train-side cache needs: keep
        # them (rotated) and divide by Λ + λ afterwards, so fitting and caching are one pass (docs/design.md §2).
        keep = keep if passes.fisher == "empirical" else None
        # draw=1: labels sampled independently of the covariance pass's, which chose the eigenbasis (the same draws
        # would measure Λ on the samples the basis was fitted to, biasing its small eigenvalues low)
        n_rows = 0
        for cb in passes.iterate(Labels.CURVATURE, desc="ekfac: eigenvalue correction", draw=1):
            n_rows += len(cb.indices)
            rows = slice(cb.indices[0], cb.indices[-1] + 1)  # batches are consecutive examples
            for name in self.layers:
                rotated = self._rotated_grads(cb, name)  # Q_Sᵀ ΣW Q_A per example, in the model's dtype
                sums[name] += rotated.square().sum(dim=0).double()
                if keep is not None:
                    keep[name][rows] = self.restrict(name, rotated) if self.kept else rotated
        n_rows = int(passes.world.sum_number(n_rows, "count examples"))
        self.eigenvalues = {name: passes.world.sum(sums[name], "sum eigenvalue corrections") / n_rows
                            for name in self.layers}
        self.set_damping()
        if keep is not None:
            for name, stored in keep.items():
                divide_rows(stored, self._kept_denominator(name, stored) if self.kept
                            else self._denominator(name, stored.dtype))
        return self.fitted(train_side=keep)
