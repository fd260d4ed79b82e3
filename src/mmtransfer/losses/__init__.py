"""Loss modules over features. Each returns one output dataclass; none keeps state."""

from .contrastive import ContrastiveLoss, ContrastiveOutput
from .matching import MatchingLoss, MatchingOutput, sample_hard_negatives

__all__ = ["ContrastiveLoss", "ContrastiveOutput", "MatchingLoss", "MatchingOutput", "sample_hard_negatives"]
