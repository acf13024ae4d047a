"""Estimators of (G + λI)⁻¹, one file each; importing this package fills the registry."""

from infkit.estimators import datainf, ekfac, exact, identity, kfac, lissa  # noqa: F401  (registration)
from infkit.estimators.base import REGISTRY, Estimator, make_estimator, register

__all__ = ["REGISTRY", "Estimator", "make_estimator", "register"]
