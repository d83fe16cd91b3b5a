"""Per-class RPN for ImageNet localization (ResNet paper, Appendix C): K binary scores and K box regressors per anchor.

"Unlike the way in [32] that is category-agnostic, our RPN for localization is designed in a per-class
form. This RPN ends with two sibling 1x1 convolutional layers for binary classification (cls) and box
regression (reg) ... the cls layer has a 1000-d output, and each dimension is binary logistic regression
for predicting being or not being an object class; the reg layer has a 1000 x 4-d output consisting of
box regressors for 1000 classes ... 8 anchors are randomly sampled for each image, where the sampled
positive and negative anchors have a ratio of 1:1." For testing, the network is applied on the image
fully-convolutionally, and for a class its top-scoring regressed anchors are the class's box proposals.

The anchors, the target assignment (IoU >= 0.7 positive, < 0.3 negative, each gt's best anchor
positive), the sampler, the box coding and the head are the Faster R-CNN RPN's
(:class:`detres.models.detection.rpn.RegionProposalNetwork`), whose head is built with ``num_classes = K``; only
the losses (on the ground-truth class's outputs) and the per-class decoding are new here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.rpn import RegionProposalNetwork, top_n_by_score
from detres.models.detection.rpn_head import RPNHead
from detres.models.detection.sampler import target_seeds
from detres.structures.boxes import clip_boxes

__all__ = ["PerClassRPN"]


class PerClassRPN(RegionProposalNetwork):
    """The Faster R-CNN RPN in per-class form (the head must have ``num_classes`` = K > 1 or any K).

    Training (``forward(features, image_sizes, targets)`` in train mode): per image the anchors are
    labelled as by the RPN, ``batch_size_per_image`` of them (8 in the paper) are sampled at
    ``positive_fraction`` (0.5), and each sampled anchor contributes a binary logistic loss on the
    output of its class — the label of the gt box it matched (positives) or overlaps most (negatives);
    positives also a smooth-L1 loss on that class's deltas. Targets' ``labels`` are 1..K.

    Eval: :meth:`class_boxes` gives, for each requested class of each image, the top-scoring regressed
    anchors of that class (after NMS), i.e. the class-dependent box proposals.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n_test: int,
        nms_thresh: float,
        allowed_border: float,
    ) -> None:
        # Only the training targets and the test-time per-class decoding are used: class boxes are capped by their
        # own ``top_n``, no proposals are made in training, localization data has no crowd regions and every
        # regressed anchor that is not degenerate is kept (min_size 0).
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            pre_nms_top_n_train=pre_nms_top_n_test,
            post_nms_top_n_train=pre_nms_top_n_test,
            pre_nms_top_n_test=pre_nms_top_n_test,
            post_nms_top_n_test=pre_nms_top_n_test,
            nms_thresh=nms_thresh,
            min_size=0.0,
            allowed_border=allowed_border,
            crowd_iof_thresh=1.0,
        )

    @classmethod
    def from_config(
        cls, rpn_cfg: Mapping[str, Any], *, anchor_generator: AnchorGenerator, head: RPNHead
    ) -> PerClassRPN:
        """The per-class RPN of a ``task: loc`` config's ``model.rpn`` tree around the given anchors and head."""
        return cls(
            anchor_generator,
            head,
            fg_iou_thresh=float(rpn_cfg["fg_iou_thresh"]),
            bg_iou_thresh=float(rpn_cfg["bg_iou_thresh"]),
            batch_size_per_image=int(rpn_cfg["batch_size_per_image"]),
            positive_fraction=float(rpn_cfg["positive_fraction"]),
            pre_nms_top_n_test=int(rpn_cfg["pre_nms_top_n_test"]),
            nms_thresh=float(rpn_cfg["nms_thresh"]),
            allowed_border=float(rpn_cfg["allowed_border"]),
        )

    def compute_class_loss(
        self,
        logits: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        labels: list[Tensor],
        matched_boxes: list[Tensor],
        classes: list[Tensor],
        seeds: Sequence[int | None] | None = None,
    ) -> dict[str, Tensor]:
        """logits [B,N,K], deltas [B,N,K,4], per image anchor labels / matched boxes / class channels (0-based)."""
        # Each anchor's own class channel, then the RPN's sampling and losses on those outputs.
        channel = torch.stack(classes).clamp(min=0)  # [B, N]; anchors without a class are labelled -1 (unused)
        class_logits = logits.gather(2, channel[..., None])[..., 0]  # [B, N]
        class_deltas = deltas.gather(2, channel[..., None, None].expand(-1, -1, 1, 4))[:, :, 0]  # [B, N, 4]
        return self.compute_loss(class_logits, class_deltas, anchors, labels, matched_boxes, seeds)

    def forward(
        self, features: Tensor, image_sizes: Sequence[Sequence[int]], targets: Sequence[dict] | None = None, **_: object
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Training: ([], {"loss_rpn_cls", "loss_rpn_box"}). Eval: use :meth:`class_boxes` / :meth:`dense`."""
        image_sizes = self._check_inputs(features, image_sizes)
        if not self.training:
            raise ValueError("PerClassRPN: forward computes training losses; at test time use class_boxes()")
        if targets is None or len(targets) != features.shape[0]:
            raise ValueError("PerClassRPN: one target (boxes, labels) per image is required in training mode")
        logits, deltas, anchors = self.predict_per_class(features)
        labels, matched, nearest = self.match_anchors(anchors, image_sizes, targets)
        num_classes = logits.shape[2]
        classes = []
        for i, (t, index) in enumerate(zip(targets, nearest)):
            gt_labels = t.get("labels")
            if gt_labels is None or gt_labels.shape[0] != t["boxes"].shape[0]:
                raise ValueError(f"PerClassRPN: targets[{i}] needs 'labels' for each of its boxes")
            gt_labels = gt_labels.to(index.device)
            if gt_labels.numel() and (int(gt_labels.min()) < 1 or int(gt_labels.max()) > num_classes):
                raise ValueError(
                    f"PerClassRPN: targets[{i}]['labels'] must lie in 1..{num_classes}, got {gt_labels.tolist()}"
                )
            if gt_labels.numel() == 0:
                classes.append(torch.full_like(index, -1))
            else:
                classes.append(torch.where(index >= 0, gt_labels[index.clamp(min=0)] - 1, torch.full_like(index, -1)))
            # An image without boxes has no class channel to train: its anchors are left out.
            labels[i] = torch.where(classes[i] >= 0, labels[i], torch.full_like(labels[i], -1))
        return [], self.compute_class_loss(logits, deltas, anchors, labels, matched, classes, target_seeds(targets))

    @torch.no_grad()
    def dense(self, features: Tensor, image_sizes: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Fully-convolutional test: (probabilities [B,N,K], decoded boxes [B,N,K,4] clipped to each image)."""
        image_sizes = self._check_inputs(features, image_sizes)
        logits, deltas, anchors = self.predict_per_class(features)
        batch, num, k = logits.shape
        boxes = self.box_coder.decode(
            deltas.reshape(-1, 4), anchors[None, :, None, :].expand(batch, num, k, 4).reshape(-1, 4)
        ).view(batch, num, k, 4)
        boxes = torch.stack([clip_boxes(b.view(-1, 4), hw).view(num, k, 4) for b, hw in zip(boxes, image_sizes)])
        return torch.sigmoid(logits), boxes

    @torch.no_grad()
    def class_boxes(
        self,
        features: Tensor,
        image_sizes: Sequence[Sequence[int]],
        classes: Sequence[Sequence[int]],
        *,
        top_n: int = 200,
        nms_thresh: float | None = None,
    ) -> list[dict[int, tuple[Tensor, Tensor]]]:
        """Per image, for each class label c (1..K) of ``classes[i]``: (boxes [n,4], scores [n]) of the class's
        ``top_n`` best regressed anchors, best first; ``nms_thresh`` (None: the RPN's) removes duplicates first.
        """
        probs, boxes = self.dense(features, image_sizes)
        nms_thresh = self.nms_thresh if nms_thresh is None else float(nms_thresh)
        out = []
        for i, wanted in enumerate(classes):
            per_class: dict[int, tuple[Tensor, Tensor]] = {}
            for c in wanted:
                if not 1 <= int(c) <= probs.shape[2]:
                    raise ValueError(f"PerClassRPN.class_boxes: class {c} outside 1..{probs.shape[2]}")
                b, s = top_n_by_score(boxes[i, :, int(c) - 1], probs[i, :, int(c) - 1], self.pre_nms_top_n("test"))
                keep = batched_nms(b, s, torch.zeros_like(s, dtype=torch.int64), nms_thresh)[: int(top_n)]
                per_class[int(c)] = (b[keep], s[keep])
            out.append(per_class)
        return out
