"""infkit: which training examples made this model do this? Influence functions for notebooks."""

from infkit import tasks
from infkit._version import __version__
from infkit.analysis import Analysis
from infkit.errors import InfkitError
from infkit.estimators import REGISTRY as ESTIMATORS
from infkit.result import InfluenceResult, TokenScores, Top

__all__ = ["Analysis", "ESTIMATORS", "InfkitError", "InfluenceResult", "TokenScores", "Top", "__version__", "tasks"]
