"""K-FAC (Martens & Grosse 2015): G ≈ T̄ · A ⊗ S per layer.

Note:
    A and S as in EK-FAC (token averages, float64 eigendecompositions). For a sequence, an example's gradient sums
    T tokens, so its second moment is about T̄ · A ⊗ S (cross-token terms neglected), T̄ the mean number of real
    tokens per example. Without this factor K-FAC scores come out ~T̄ times EK-FAC's. The eigenvalues of the block
    are Λ[i, j] = T̄ · λ_S[i] · λ_A[j]; preconditioning is EK-FAC's formula with this Λ, and the default
    λ = 0.1 · mean(Λ). One pass over the train data.
"""

from __future__ import annotations

import torch

from infkit.estimators.base import register
from infkit.estimators.ekfac import KroneckerEigenbasis


@register("kfac")
class KFAC(KroneckerEigenbasis):
    def fit(self, passes, keep=None):
        self.fit_kronecker_factors(passes)
        for name in self.layers:
            lam_s = self.eigvals_s[name].clamp(min=0)
            lam_a = self.eigvals_a[name].clamp(min=0)
            self.eigenvalues[name] = self.mean_tokens[name] * torch.outer(lam_s, lam_a)
        self.set_damping()
        return self.fitted()
