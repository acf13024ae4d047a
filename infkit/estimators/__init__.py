"""Estimators of (G + λI)⁻¹, one file each; importing this package fills the registry."""

from infkit.estimators import ekfac, exact, identity, kfac  # noqa: F401  (registration)
from infkit.estimators.base import REGISTRY, Estimator, make_estimator, register

__all__ = ["REGISTRY", "Estimator", "make_estimator", "register"]
