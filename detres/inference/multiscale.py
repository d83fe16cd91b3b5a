"""Multi-scale testing (ResNet paper, Appendix B): an image pyramid, two adjacent levels per RoI, merged by maxout.

"We compute conv feature maps on an image pyramid, where the image's shorter sides are
s in {200, 400, 600, 800, 1000}. We select two adjacent scales from the pyramid following [33]. RoI
pooling and subsequent layers are performed on the feature maps of these two scales, which are merged
by maxout." The level choice follows NoC/SPP-net: for each RoI, the level where its scaled area is
closest to ``reference_size``² (224², the pre-training crop) and the neighbour on the other side of it.

Proposals come from the RPN at the network input's (training) scale; ``pyramid_proposals`` also runs
the RPN on every level and merges the sets (NMS 0.7 on the union). The RoIs of each level go through
the post-RoI layers (conv5) in one batched call (on CPU in the heads' inference chunks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from detres.inference.proposal_merge import merge_proposal_sets
from detres.inference.region_scorer import Scored, SingleScaleScorer
from detres.models.detection.context import with_context

__all__ = ["select_levels", "MultiScaleScorer"]


def select_levels(areas: Tensor, reference_area: float) -> tuple[Tensor, Tensor]:
    """The two adjacent pyramid levels of each RoI: (lower [R], upper [R] = lower + 1) level indices.

    ``areas``: [R, L] each RoI's area at each level, increasing along L (levels sorted by scale).
    The pair brackets ``reference_area``: the largest level where the RoI is still smaller than the
    reference and the next one (so one of the two is the level closest to it, the other its neighbour
    on the other side). A RoI smaller than the reference even at the top level takes the top two levels,
    one larger than it at the bottom level the bottom two. With one level, both indices are 0.
    """
    if areas.dim() != 2 or areas.shape[1] < 1:
        raise ValueError(f"select_levels: areas must be [R, L] with L >= 1, got {tuple(areas.shape)}")
    num_levels = areas.shape[1]
    if num_levels == 1:
        zeros = torch.zeros(areas.shape[0], dtype=torch.int64, device=areas.device)
        return zeros, zeros.clone()
    below = (areas < reference_area).sum(dim=1)  # levels at which the RoI is smaller than the reference
    lower = (below - 1).clamp(min=0, max=num_levels - 2)
    return lower, lower + 1


class MultiScaleScorer:
    """One model on an image pyramid; each RoI is scored from the maxout of its two levels' region features.

    Args:
        model: a ``FasterRCNN`` in eval mode (plain or global-context RoI heads).
        images: the network input images (at the test scale), 0..255, a padded batch [B,3,H,W] with
            ``image_sizes`` or a list.
        image_sizes: valid (h, w) per image of a padded batch.
        scales: pyramid shorter sides, e.g. (200, 400, 600, 800, 1000); sorted here.
        max_size_ratio: a level's longer side is at most ``scale * max_size_ratio``; None = the ratio of the
            model's test scale (its transform's ``max_size / min_size``). The level sizes are the model's
            transform's (:meth:`DetectorTransform.scaled_size`) for the input image's size.
        reference_size: the RoI side (pixels at a level) the level choice aims at (224: the pre-training crop).
        pyramid_proposals: also run the RPN on every level and merge all proposal sets.
        proposal_nms_thresh, max_proposals: the merge's NMS threshold and cap (``pyramid_proposals`` only;
            None = the RPN's test-time NMS threshold and post-NMS top-n).

    A level whose size equals the input's reuses the input's features; the other levels are resized from
    the input image (bilinear, antialiased when shrinking) and computed once, on first use.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        images: Sequence[Tensor] | Tensor,
        image_sizes: Sequence[Sequence[int]] | None = None,
        *,
        scales: Sequence[float] = (200, 400, 600, 800, 1000),
        max_size_ratio: float | None = None,
        reference_size: float = 224,
        pyramid_proposals: bool = False,
        proposal_nms_thresh: float | None = None,
        max_proposals: int | None = None,
    ) -> None:
        if len(scales) == 0 or any(float(s) <= 0 for s in scales):
            raise ValueError(f"MultiScaleScorer: scales must be a non-empty list of positive sizes, got {list(scales)}")
        if max_size_ratio is not None and max_size_ratio < 1.0:
            raise ValueError(f"MultiScaleScorer: max_size_ratio must be >= 1, got {max_size_ratio}")
        if reference_size <= 0:
            raise ValueError(f"MultiScaleScorer: reference_size must be positive, got {reference_size}")
        self.base = SingleScaleScorer(model, images, image_sizes)
        self.model = model
        self.image_sizes = self.base.image_sizes
        self.scales = sorted(float(s) for s in scales)
        self.reference_area = float(reference_size) ** 2
        self.pyramid_proposals = bool(pyramid_proposals)
        self.proposal_nms_thresh = proposal_nms_thresh
        self.max_proposals = max_proposals
        self._images = _valid_images(images, self.image_sizes)
        # Per level, per image: the resized (h, w) and the per-axis factors (sx, sy) from the input.
        self.level_sizes = [[self._level_size(hw, s, max_size_ratio) for hw in self.image_sizes] for s in self.scales]
        self.level_factors = torch.tensor(
            [[[lw / w, lh / h] for (lh, lw), (h, w) in zip(sizes, self.image_sizes)] for sizes in self.level_sizes],
            dtype=torch.float32,
        )  # [L, B, 2]
        self._features: dict[int, tuple[Tensor, list[tuple[int, int]]]] = {}

    # ------------------------------------------------------------------------------------- levels
    def _level_size(self, hw: tuple[int, int], scale: float, max_size_ratio: float | None) -> tuple[int, int]:
        cap = None if max_size_ratio is None else scale * max_size_ratio
        return self.model.transform.scaled_size(hw, scale, cap)

    def level_features(self, level: int) -> tuple[Tensor, list[tuple[int, int]]]:
        """(trunk features [B,C,h,w], valid sizes) of pyramid level ``level``, computed on first use."""
        if level not in self._features:
            sizes = self.level_sizes[level]
            if sizes == self.image_sizes:
                self._features[level] = (self.base.features, list(self.image_sizes))
            else:
                resized = [_resize(img, hw) for img, hw in zip(self._images, sizes)]
                batch, valid = self.model.preprocess(resized)
                self._features[level] = (self.model.trunk(batch), valid)
        return self._features[level]

    def propose(self) -> tuple[list[Tensor], list[Tensor]]:
        base = self.base.propose()
        if not self.pyramid_proposals:
            return base
        rpn = self.model.rpn
        sets = [base]
        for level in range(len(self.scales)):
            if self.level_sizes[level] == self.image_sizes:
                continue  # the base set already covers this level
            features, sizes = self.level_features(level)
            boxes, scores = rpn.propose_scored(features, sizes, mode="test")
            factors = self.level_factors[level].to(features.device)
            sets.append(([b / factors[i].repeat(2) for i, b in enumerate(boxes)], scores))
        nms_thresh = rpn.nms_thresh if self.proposal_nms_thresh is None else self.proposal_nms_thresh
        cap = rpn.post_nms_top_n("test") if self.max_proposals is None else self.max_proposals
        return merge_proposal_sets(sets, nms_thresh=nms_thresh, max_proposals=cap)

    # ------------------------------------------------------------------------------------- scoring
    def choose_levels(self, rois: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(lower, upper) level of every RoI of every image, concatenated: [sum Ni] each."""
        lowers, uppers = [], []
        for i, r in enumerate(rois):
            wh = (r[:, 2:] - r[:, :2]).clamp(min=0).float()  # [Ni, 2] at the input scale
            factors = self.level_factors[:, i].to(wh.device)  # [L, 2]
            areas = (wh[:, None, :] * factors[None]).prod(dim=2)  # [Ni, L]
            lower, upper = select_levels(areas, self.reference_area)
            lowers.append(lower)
            uppers.append(upper)
        device = self.base.features.device
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return (torch.cat(lowers) if lowers else empty), (torch.cat(uppers) if uppers else empty)

    def score(self, rois: Sequence[Tensor]) -> Scored:
        heads = self.model.roi_heads
        device = self.base.features.device
        rois = [r.to(device=device, dtype=torch.float32) for r in rois]
        counts = [int(r.shape[0]) for r in rois]
        image_of = torch.repeat_interleave(torch.arange(len(rois), device=device), torch.tensor(counts, device=device))
        flat = torch.cat(rois) if rois else torch.zeros(0, 4, device=device)
        lower, upper = self.choose_levels(rois)
        used = sorted(set(lower.tolist()) | set(upper.tolist()))
        # Pool every (RoI, level) pair a RoI needs and run the post-RoI layers on them, level by level.
        vectors, owners, contexts = [], [], []
        for level in used:
            features, sizes = self.level_features(level)
            members = torch.nonzero((lower == level) | (upper == level)).squeeze(1)
            factors = self.level_factors[level].to(device)[image_of[members]].repeat(1, 2)  # [n, 4]
            scaled = flat[members] * factors
            per_image = [scaled[image_of[members] == i] for i in range(len(rois))]
            vectors.append(heads.pooled_box_head(features, per_image))
            # The rows come image by image: reorder the owners the same way.
            owners.append(torch.cat([members[image_of[members] == i] for i in range(len(rois))]))
            if hasattr(heads, "context_features"):  # global context: the level's own whole-image vector
                contexts.append(heads.context_features(features, sizes))
        vectors = torch.cat(vectors) if vectors else None
        merged = self._maxout(vectors, owners, used, lower, upper, contexts, image_of, flat.shape[0])
        logits, deltas = heads.predict(merged)
        return heads.decode_predictions(logits, deltas, rois)

    def _maxout(self, vectors, owners, used, lower, upper, contexts, image_of, num_rois) -> Tensor:
        """[R, D]: element-wise max of each RoI's region vectors at its lower and upper level."""
        heads = self.model.roi_heads
        width = heads.predictor.cls_score.in_features
        device = self.base.features.device
        if vectors is None:
            return torch.zeros(0, width, device=device)
        at_lower = vectors.new_full((num_rois, width), -math.inf)
        at_upper = at_lower.clone()
        start = 0
        for k, (level, members) in enumerate(zip(used, owners)):
            block = vectors[start : start + members.shape[0]]
            start += members.shape[0]
            if contexts:
                block = with_context(block, contexts[k], image_of[members])
            is_lower, is_upper = lower[members] == level, upper[members] == level
            at_lower[members[is_lower]] = block[is_lower]
            at_upper[members[is_upper]] = block[is_upper]
        return torch.maximum(at_lower, at_upper)


def _valid_images(images: Sequence[Tensor] | Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Each image's unpadded 0..255 pixels [3,h,w]."""
    if isinstance(images, Tensor) and images.dim() == 3:
        images = [images]
    return [img[:, :h, :w].float() for img, (h, w) in zip(images, sizes)]


def _resize(image: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bilinear resize of a [3,h,w] image to ``hw`` (antialiased when shrinking, as an image library would)."""
    if tuple(image.shape[1:]) == tuple(hw):
        return image
    shrink = hw[0] < image.shape[1] or hw[1] < image.shape[2]
    return F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False, antialias=shrink)[0]
