"""Objectives: what a task computes from a batch, ``(batch, StepInfo) -> TaskOutput``.

    base       StepInfo and TaskOutput, the interface with the training loop
    captions   contrastive alignment + image-text matching on captioned images
    labels     cross-entropy on labelled images
    domain     a task loss plus a domain loss (DANN, CDAN, MMD, CORAL), for classifiers and multimodal models
    distill    a student learning a frozen teacher's outputs
    multitask  captions, labels and a domain loss on one mixed batch
    weighting  how a multi-task run's losses add up (fixed or uncertainty weighting)
"""

from .base import StepInfo, TaskOutput
from .captions import CaptionObjective, CaptionObjectiveConfig, CaptionTask, caption_groups, evaluate_retrieval

__all__ = ["CaptionObjective", "CaptionObjectiveConfig", "CaptionTask", "StepInfo", "TaskOutput", "caption_groups",
           "evaluate_retrieval"]
