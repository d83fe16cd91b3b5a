"""Fast R-CNN RoI heads on a C4 feature map: RoI pooling, the conv5 box head, the sibling predictor, sampling, losses,
inference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from detres.models.backbones.cpu_execution import cpu_roi_chunk
from detres.models.detection.box_coder import BoxCoder
from detres.models.detection.box_head import BoxHead, FastRCNNPredictor
from detres.models.detection.matcher import Matcher, crowd_ignore_mask
from detres.models.detection.postprocess import DetectionPostprocess
from detres.models.detection.roi_pooler import RoIPooler
from detres.models.detection.sampler import BalancedSampler, target_seeds

__all__ = ["RoIHeads"]


def _check_targets(targets: Sequence[dict[str, torch.Tensor]], num_images: int) -> None:
    if len(targets) != num_images:
        raise ValueError(f"RoIHeads: got {len(targets)} targets for {num_images} images")
    for i, t in enumerate(targets):
        for key in ("boxes", "labels"):
            if key not in t:
                raise ValueError(f"RoIHeads: targets[{i}] has no '{key}' entry")
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(
                f"RoIHeads: targets[{i}]['boxes'] must be float [N,4], got {boxes.dtype} {tuple(boxes.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0] or labels.dtype != torch.int64:
            raise ValueError(
                f"RoIHeads: targets[{i}]['labels'] must be int64 [{boxes.shape[0]}], "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        crowd = t.get("crowd_boxes")
        if crowd is not None and (not isinstance(crowd, torch.Tensor) or crowd.dim() != 2 or crowd.shape[1] != 4):
            shape = tuple(crowd.shape) if isinstance(crowd, torch.Tensor) else type(crowd).__name__
            raise ValueError(f"RoIHeads: targets[{i}]['crowd_boxes'] must be [C,4], got {shape}")


class RoIHeads(nn.Module):
    """Fast R-CNN detection stage on shared C4 features.

    The pipeline is split into overridable steps so that Appendix-B extensions can reuse it:
    ``select_training_samples`` -> ``region_features`` (pool + head; the hook for global
    context / multi-scale maxout) -> ``predict`` -> ``losses`` / ``decode_predictions`` ->
    ``postprocess_detections``.

    Sampling (Fast R-CNN): foreground = IoU >= ``fg_iou_thresh`` with some gt; background =
    max IoU in [``bg_iou_thresh_lo``, ``bg_iou_thresh_hi``); everything else (e.g. IoU below
    ``bg_iou_thresh_lo``) is ignored and never sampled. With ``bg_iou_thresh_lo=0`` proposals of
    images without objects are background; otherwise such images contribute no RoIs.

    ``inference_roi_chunk``: on CPU outside training, pool and run the box head on at most this
    many RoIs of one image at a time (<= 0: all at once); with several threads the chunk grows
    (:func:`cpu_roi_chunk`). Each RoI is processed independently, so the outputs are the same up
    to fp32 rounding, while the peak memory of a 300-RoI ResNet-50 head drops from ~0.8 GB to
    ~0.1 GB, which measured ~25% faster on CPU at 1 thread (benchmarks/README.md). GPUs keep the
    one-shot call (they need the large batch).
    """

    def __init__(
        self,
        pooler: RoIPooler,
        box_head: BoxHead,
        predictor: FastRCNNPredictor,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh_hi: float,
        bg_iou_thresh_lo: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights: Sequence[float],
        crowd_iof_thresh: float,
        postprocess: DetectionPostprocess,
        add_gt_as_proposals: bool = True,
        smooth_l1_beta: float = 1.0,
        inference_roi_chunk: int = 32,
    ) -> None:
        super().__init__()
        if not 0.0 <= bg_iou_thresh_lo <= bg_iou_thresh_hi <= fg_iou_thresh <= 1.0:
            raise ValueError(
                "RoIHeads: need 0 <= bg_iou_thresh_lo <= bg_iou_thresh_hi <= fg_iou_thresh <= 1, got "
                f"lo={bg_iou_thresh_lo}, hi={bg_iou_thresh_hi}, fg={fg_iou_thresh}"
            )
        if batch_size_per_image < 1:
            raise ValueError(f"RoIHeads: batch_size_per_image must be >= 1, got {batch_size_per_image}")
        if not 0.0 < positive_fraction <= 1.0:
            raise ValueError(f"RoIHeads: positive_fraction must be in (0, 1], got {positive_fraction}")
        if smooth_l1_beta < 0:
            raise ValueError(f"RoIHeads: smooth_l1_beta must be >= 0, got {smooth_l1_beta}")
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.fg_iou_thresh = float(fg_iou_thresh)
        self.bg_iou_thresh_hi = float(bg_iou_thresh_hi)
        self.bg_iou_thresh_lo = float(bg_iou_thresh_lo)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.add_gt_as_proposals = bool(add_gt_as_proposals)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.inference_roi_chunk = int(inference_roi_chunk)
        self.crowd_iof_thresh = float(crowd_iof_thresh)
        self.postprocess = postprocess  # test time: score threshold, per-class NMS, top-k, voting
        self.box_coder = BoxCoder(weights=tuple(bbox_reg_weights))
        # IoU >= fg -> matched gt index; IoU < hi -> -1 (background candidate); between -> -2.
        self.matcher = Matcher(
            high_threshold=self.fg_iou_thresh,
            low_threshold=self.bg_iou_thresh_hi,
            allow_low_quality_matches=False,
        )
        self.sampler = BalancedSampler(
            batch_size_per_image=self.batch_size_per_image, positive_fraction=self.positive_fraction, stream=2
        )

    @classmethod
    def from_config(
        cls,
        roi_cfg: Mapping[str, Any],
        *,
        pooler: RoIPooler,
        box_head: BoxHead,
        predictor: FastRCNNPredictor,
        **options: Any,
    ) -> RoIHeads:
        """The heads of a ``model.roi_heads`` config tree around the given pooler, box head and predictor;
        ``options``: constructor arguments that have no config key (``add_gt_as_proposals``, ``smooth_l1_beta``,
        ``inference_roi_chunk``)."""
        return cls(
            pooler,
            box_head,
            predictor,
            fg_iou_thresh=float(roi_cfg["fg_iou_thresh"]),
            bg_iou_thresh_hi=float(roi_cfg["bg_iou_thresh_hi"]),
            bg_iou_thresh_lo=float(roi_cfg["bg_iou_thresh_lo"]),
            batch_size_per_image=int(roi_cfg["batch_size_per_image"]),
            positive_fraction=float(roi_cfg["positive_fraction"]),
            bbox_reg_weights=[float(w) for w in roi_cfg["bbox_reg_weights"]],
            crowd_iof_thresh=float(roi_cfg["crowd_iof_thresh"]),
            postprocess=DetectionPostprocess.from_config(roi_cfg),
            **options,
        )

    # ----------------------------------------------------------------------------------- training
    def assign_targets(
        self,
        proposals: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        ignore: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Label one image's proposals: (class labels [P] with 0 = bg and -1 = ignore, matched gt boxes [P,4]).

        ``ignore``: Bool[P] of proposals to label -1 whatever their overlaps (the crowd filter).
        """
        num_props = proposals.shape[0]
        if gt_boxes.shape[0] == 0:
            # No objects: every proposal has IoU 0, which is background only when lo == 0.
            fill = 0 if self.bg_iou_thresh_lo <= 0.0 else -1
            labels = torch.full((num_props,), fill, dtype=torch.int64, device=proposals.device)
            matched_boxes = torch.zeros_like(proposals)
        else:
            iou = box_iou(gt_boxes, proposals)  # [G, P]
            matched = self.matcher(iou)
            max_iou = iou.max(dim=0).values
            labels = gt_labels[matched.clamp(min=0)].to(torch.int64)
            below = matched == Matcher.BELOW_LOW_THRESHOLD
            labels[below] = 0
            labels[(matched == Matcher.BETWEEN_THRESHOLDS) | (below & (max_iou < self.bg_iou_thresh_lo))] = -1
            matched_boxes = gt_boxes[matched.clamp(min=0)]
        if ignore is not None:
            labels[ignore] = -1
        return labels, matched_boxes

    def select_training_samples(
        self, proposals: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Sample RoIs per image; returns (sampled proposals [Si,4], labels [Si] in 0..K, regression targets [Si,4])."""
        _check_targets(targets, len(proposals))
        all_labels, all_matched, all_props = [], [], []
        for props, t in zip(proposals, targets):
            props = props.detach()
            gt_boxes = t["boxes"].to(props.dtype)
            # Only the RPN's proposals are crowd-filtered; the gt boxes appended below never are.
            ignore = crowd_ignore_mask(props, t.get("crowd_boxes"), self.crowd_iof_thresh)
            if self.add_gt_as_proposals:
                props = torch.cat([props, gt_boxes], dim=0)
                ignore = torch.cat([ignore, ignore.new_zeros(gt_boxes.shape[0])])
            labels, matched_boxes = self.assign_targets(props, gt_boxes, t["labels"], ignore)
            all_props.append(props)
            all_labels.append(labels)
            all_matched.append(matched_boxes)
        # Sampler convention: >= 1 positive, 0 negative, -1 ignored.
        pos_masks, neg_masks = self.sampler(all_labels, target_seeds(targets))

        out_props, out_labels, out_targets = [], [], []
        for props, labels, matched_boxes, pos, neg in zip(all_props, all_labels, all_matched, pos_masks, neg_masks):
            keep = torch.nonzero(pos | neg).squeeze(1)
            props, labels, matched_boxes = props[keep], labels[keep], matched_boxes[keep]
            fg = labels > 0
            reg = torch.zeros_like(props)
            reg[fg] = self.box_coder.encode(matched_boxes[fg], props[fg])
            out_props.append(props)
            out_labels.append(labels)
            out_targets.append(reg)
        return out_props, out_labels, out_targets

    def losses(
        self,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        labels: Sequence[torch.Tensor] | torch.Tensor,
        regression_targets: Sequence[torch.Tensor] | torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Softmax cross-entropy over sampled RoIs + smooth-L1 on the true class's deltas of fg RoIs / #RoIs."""
        labels = torch.cat(list(labels)) if not isinstance(labels, torch.Tensor) else labels
        if not isinstance(regression_targets, torch.Tensor):
            regression_targets = torch.cat(list(regression_targets))
        num_rois = labels.numel()
        if num_rois == 0:
            zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
            return {"loss_cls": zero, "loss_box_reg": zero.clone()}
        loss_cls = F.cross_entropy(class_logits, labels)
        fg = torch.nonzero(labels > 0).squeeze(1)
        deltas = box_deltas.reshape(num_rois, -1, 4)
        cols = labels[fg] if deltas.shape[1] > 1 else torch.zeros_like(fg)
        loss_box = F.smooth_l1_loss(deltas[fg, cols], regression_targets[fg], beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / num_rois}

    # ------------------------------------------------------------------------------------ shared
    def region_features(
        self, features: torch.Tensor, proposals: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """Pool every proposal and run the box head: [sum Ni, D]. ``image_sizes`` is for subclasses (context:
        :class:`detres.models.detection.context.ContextRoIHeads`)."""
        return self.pooled_box_head(features, proposals)

    def pooled_box_head(self, features: torch.Tensor, rois: Sequence[torch.Tensor]) -> torch.Tensor:
        """The box head on ``rois`` (per image) pooled from ``features``: [sum Ni, D], rows image by image.

        At inference on CPU, in chunks of at most :func:`cpu_roi_chunk` RoIs of one image (see the class
        docstring): the same rows in the same order as the one-shot call, with a fraction of its memory.
        """
        chunk = cpu_roi_chunk(self.inference_roi_chunk)
        # A trace would freeze the example's chunk count: an exported model runs the one-shot call (same rows).
        one_shot = self.training or chunk <= 0 or features.device.type != "cpu" or torch.jit.is_tracing()
        if one_shot or sum(r.shape[0] for r in rois) <= chunk:
            return self.box_head(self.pooler(features, rois))
        parts = [
            self.box_head(self.pooler(features[i : i + 1], [boxes[start : start + chunk]]))
            for i, boxes in enumerate(rois)
            for start in range(0, boxes.shape[0], chunk)
        ]
        return torch.cat(parts)

    def predict(self, region_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[R,D] -> (class_logits [R,K+1], box_deltas [R,4(K+1)])."""
        return self.predictor(region_feats)

    # ----------------------------------------------------------------------------------- inference
    def decode_predictions(
        self, class_logits: torch.Tensor, box_deltas: torch.Tensor, proposals: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: class probabilities [Ni,K+1] and decoded per-class boxes [Ni,K+1,4] (or [Ni,4] if agnostic).

        Exposed so ensembles / box refinement can average or merge scores and boxes before NMS.
        """
        counts = [p.shape[0] for p in proposals]
        probs = F.softmax(class_logits, dim=-1)
        if sum(counts) == 0:
            boxes = box_deltas.new_zeros((0, class_logits.shape[1], 4))
        else:
            boxes = self.box_coder.decode(box_deltas, torch.cat(list(proposals)).to(box_deltas.dtype))
        return list(probs.split(counts)), list(boxes.split(counts))

    def postprocess_detections(
        self,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        proposals: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Softmax, decode, then :attr:`postprocess` (score threshold, per-class NMS or soft-NMS, top-k, voting)."""
        probs, boxes = self.decode_predictions(class_logits, box_deltas, proposals)
        return self.postprocess_decoded(probs, boxes, image_sizes)

    def postprocess_decoded(
        self,
        probs: Sequence[torch.Tensor],
        boxes: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        *,
        postprocess: DetectionPostprocess | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Per image, the detections of decoded probabilities / boxes (also the test-time augmentation's last step);
        ``postprocess``: another post-processing than the heads' own (a test configuration's)."""
        step = self.postprocess if postprocess is None else postprocess
        return [step(p, b, hw) for p, b, hw in zip(probs, boxes, image_sizes)]

    def forward(
        self,
        features: torch.Tensor,
        proposals: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Training: ([], {"loss_cls", "loss_box_reg"}); eval: (detections per image, {})."""
        if len(proposals) != features.shape[0] or len(image_sizes) != features.shape[0]:
            raise ValueError(
                f"RoIHeads: batch of {features.shape[0]} feature maps but {len(proposals)} proposal sets "
                f"and {len(image_sizes)} image sizes"
            )
        if self.training:
            if targets is None:
                raise ValueError("RoIHeads: targets are required in training mode")
            proposals, labels, reg_targets = self.select_training_samples(proposals, targets)
            logits, deltas = self.predict(self.region_features(features, proposals, image_sizes))
            return [], self.losses(logits, deltas, labels, reg_targets)
        logits, deltas = self.predict(self.region_features(features, proposals, image_sizes))
        return self.postprocess_detections(logits, deltas, proposals, image_sizes), {}
