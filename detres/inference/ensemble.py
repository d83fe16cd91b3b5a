"""Ensembles (ResNet paper, Appendix B): several detectors act as one — union of their proposals, averaged scores.

"Every RPN proposes on the image, the union of proposals (NMS 0.7) is scored by every model's region
classifier, class probabilities and class-specific boxes are averaged over models", then the usual
post-processing. Members may differ in depth, backbone and global context; they must share the class
list. The averaging itself is :class:`detres.inference.region_scorer.AveragedScorer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from detres.inference.proposal_merge import merge_proposal_sets
from detres.inference.region_scorer import RegionScorer
from detres.models.build import load_detector

__all__ = ["load_ensemble", "ensemble_proposals"]


def load_ensemble(
    checkpoints: Sequence[str | os.PathLike], *, device: torch.device | str = "cpu"
) -> tuple[list[torch.nn.Module], dict[str, Any]]:
    """Load every train_det checkpoint; returns (models in eval mode, the first one's metadata).

    The test scale (the first model's transform resizes for all) and category mapping are the first's; every member must
    have been trained on the same classes in the same order (an error names the first one that differs).
    The returned metadata lists all members under ``ensemble_checkpoints``.
    """
    if len(checkpoints) == 0:
        raise ValueError("load_ensemble: no checkpoints given")
    models, metas = [], []
    for path in checkpoints:
        model, meta = load_detector(path, device=device)
        models.append(model)
        metas.append(meta)
    first = metas[0]["class_names"]
    for path, meta in zip(checkpoints[1:], metas[1:]):
        if meta["class_names"] != first:
            raise ValueError(
                f"{path} was trained on classes {meta['class_names']}, but {checkpoints[0]} on {first}: "
                "ensemble members must share the class list"
            )
    return models, dict(metas[0], ensemble_checkpoints=[str(p) for p in checkpoints])


def ensemble_proposals(
    scorers: Sequence[RegionScorer], *, nms_thresh: float = 0.7, max_proposals: int = 300
) -> tuple[list[Tensor], list[Tensor]]:
    """Every member proposes; per image the union, NMS at ``nms_thresh`` by objectness, the best ``max_proposals``."""
    return merge_proposal_sets([s.propose() for s in scorers], nms_thresh=nms_thresh, max_proposals=max_proposals)
