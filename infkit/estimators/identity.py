"""Gradient dot product: score(q, i) = ∇f(z_q)ᵀ ∇L(z_i), the "Hessian-free" baseline.

The curvature is taken as the identity and damping is ignored, so these scores are not on the scale of the
curvature-based estimators (they differ by roughly the inverse of a typical curvature eigenvalue); compare them
by correlation or ranking, not by magnitude.
"""

from __future__ import annotations

from infkit.estimators.base import Estimator, Grads, register


@register("identity")
class Identity(Estimator):
    needs_fit = False
    fit_passes = 0
    default_fisher = None
    fisher_reason = "no curvature"
    projection_kind = "random"  # a projected store: seeded Gaussian projections, inner products estimated

    def fit(self, passes, keep=None):
        self.damping_used = {name: 0.0 for name in self.layers}
        return self.fitted()

    def precondition(self, grads: Grads) -> Grads:
        return dict(grads)

    def load_state(self, state, damping_used) -> None:
        self.damping_used = dict(damping_used)
