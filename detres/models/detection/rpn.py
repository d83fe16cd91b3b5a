"""Region Proposal Network (Ren et al. 2015) on a single C4 feature map: head, target assignment, losses, proposals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou

from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.box_coder import BoxCoder
from detres.models.detection.matcher import Matcher, crowd_ignore_mask
from detres.models.detection.rpn_head import RPNHead
from detres.models.detection.sampler import BalancedSampler, target_seeds
from detres.structures.boxes import boxes_inside_image, check_image_hw, clip_boxes, nonempty_mask

__all__ = ["RPNHead", "RegionProposalNetwork", "top_n_by_score"]


# Compiled when traced (export): a trace would freeze the branch and the example image's count.
@torch.jit._script_if_tracing
def top_n_by_score(boxes: Tensor, scores: Tensor, top_n: int) -> tuple[Tensor, Tensor]:
    """boxes [N, 4], scores [N] -> the ``top_n`` highest-scoring, best first, where N is larger; else all, as given."""
    if scores.shape[0] > top_n:
        scores, order = scores.topk(top_n)
        boxes = boxes[order]
    return boxes, scores


class RegionProposalNetwork(nn.Module):
    """Faster R-CNN RPN: proposals for every image and, in training mode, the RPN losses.

    Training targets: anchors with IoU >= fg_iou_thresh to some gt, and each gt's best anchor(s), are
    positive; IoU < bg_iou_thresh negative; the band between is ignored. Cross-boundary anchors (not
    inside the valid image region enlarged by ``allowed_border``) are ignored in training;
    ``allowed_border < 0`` keeps all anchors. Images without gt boxes give only negatives.
    ``batch_size_per_image`` anchors are sampled per image, at most ``positive_fraction`` positive.
    Crowd regions (an optional ``crowd_boxes`` [C, 4] entry of a target; they are not in ``boxes``):
    an anchor lying more than ``crowd_iof_thresh`` inside one (intersection over the anchor's own
    area) is ignored, neither positive nor negative, instead of becoming background; it is also
    never a gt box's best-matching anchor. ``crowd_iof_thresh >= 1`` turns this off.

    Losses (Ren et al.'s weighting, as in their released code): ``loss_rpn_cls`` is binary
    cross-entropy averaged over the sampled anchors; ``loss_rpn_box`` is smooth-L1 (``smooth_l1_beta``)
    summed over positive anchors divided by the number of sampled anchors (0 when no positives).
    Losses are computed only in training mode (``self.training``), where ``targets`` is required.

    Proposals (per image, computed without gradient): decode deltas on all anchors, clip to the valid
    region ``image_sizes[i]``, drop boxes unless width and height > ``min_size`` (input pixels; 0 drops
    only degenerate boxes -- Ren et al. used 16 pixels at original scale, i.e. pass 16 * scale), keep the
    ``pre_nms_top_n`` highest-scoring, NMS at ``nms_thresh``, keep the ``post_nms_top_n`` best. The
    train/test values are picked by ``self.training`` unless a ``mode`` is given (:meth:`propose`).

    Besides ``forward`` (proposals and, in training, losses), :meth:`propose` (proposals only) and
    ``forward(..., compute_proposals=False)`` (losses only) serve the 4-step alternating training,
    whose RPN steps need no proposals and whose Fast R-CNN steps need no RPN losses.
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
        pre_nms_top_n_train: int,
        post_nms_top_n_train: int,
        pre_nms_top_n_test: int,
        post_nms_top_n_test: int,
        nms_thresh: float,
        min_size: float,
        allowed_border: float,
        crowd_iof_thresh: float,
        box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        smooth_l1_beta: float = 1.0 / 9,
    ) -> None:
        super().__init__()
        num_anchors = anchor_generator.num_anchors_per_location()
        if getattr(head, "num_anchors", num_anchors) != num_anchors:
            raise ValueError(
                f"RegionProposalNetwork: head predicts {head.num_anchors} anchors per location but the "
                f"anchor generator makes {num_anchors}"
            )
        for name, value in (
            ("pre_nms_top_n_train", pre_nms_top_n_train),
            ("post_nms_top_n_train", post_nms_top_n_train),
            ("pre_nms_top_n_test", pre_nms_top_n_test),
            ("post_nms_top_n_test", post_nms_top_n_test),
        ):
            if int(value) <= 0:
                raise ValueError(f"RegionProposalNetwork: {name} must be positive, got {value}")
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=box_coder_weights)
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction, stream=1)
        self._pre_nms_top_n = {"train": int(pre_nms_top_n_train), "test": int(pre_nms_top_n_test)}
        self._post_nms_top_n = {"train": int(post_nms_top_n_train), "test": int(post_nms_top_n_test)}
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.allowed_border = float(allowed_border)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.crowd_iof_thresh = float(crowd_iof_thresh)

    @classmethod
    def from_config(
        cls, rpn_cfg: Mapping[str, Any], *, anchor_generator: AnchorGenerator, head: RPNHead, **options: Any
    ) -> RegionProposalNetwork:
        """The RPN of a ``model.rpn`` config tree around the given anchors and head; ``options``: constructor
        arguments that have no config key (``box_coder_weights``, ``smooth_l1_beta``)."""
        return cls(
            anchor_generator,
            head,
            fg_iou_thresh=float(rpn_cfg["fg_iou_thresh"]),
            bg_iou_thresh=float(rpn_cfg["bg_iou_thresh"]),
            batch_size_per_image=int(rpn_cfg["batch_size_per_image"]),
            positive_fraction=float(rpn_cfg["positive_fraction"]),
            pre_nms_top_n_train=int(rpn_cfg["pre_nms_top_n_train"]),
            post_nms_top_n_train=int(rpn_cfg["post_nms_top_n_train"]),
            pre_nms_top_n_test=int(rpn_cfg["pre_nms_top_n_test"]),
            post_nms_top_n_test=int(rpn_cfg["post_nms_top_n_test"]),
            nms_thresh=float(rpn_cfg["nms_thresh"]),
            min_size=float(rpn_cfg["min_size"]),
            allowed_border=float(rpn_cfg["allowed_border"]),
            crowd_iof_thresh=float(rpn_cfg["crowd_iof_thresh"]),
            **options,
        )

    def _mode(self, mode: str | None) -> str:
        if mode is None:
            return "train" if self.training else "test"
        if mode not in ("train", "test"):
            raise ValueError(f"RegionProposalNetwork: mode must be 'train', 'test' or None, got {mode!r}")
        return mode

    def pre_nms_top_n(self, mode: str | None = None) -> int:
        return self._pre_nms_top_n[self._mode(mode)]

    def post_nms_top_n(self, mode: str | None = None) -> int:
        return self._post_nms_top_n[self._mode(mode)]

    # ----------------------------------------------------------------------------------- proposals
    @torch.no_grad()
    def filter_proposals(
        self, boxes: Tensor, objectness: Tensor, image_sizes: Sequence[Sequence[int]], mode: str | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """boxes [B, N, 4] decoded, objectness [B, N] logits -> per image (boxes [Ni, 4], scores [Ni]).

        Scores are sigmoid probabilities, sorted in decreasing order. ``mode`` ("train" / "test")
        picks the top-n values; None = by ``self.training``.
        """
        pre_n, post_n = self.pre_nms_top_n(mode), self.post_nms_top_n(mode)
        cand_boxes, cand_scores, cand_image = [], [], []
        for i, image_hw in enumerate(image_sizes):
            b = clip_boxes(boxes[i], image_hw)
            s = objectness[i]
            keep = nonempty_mask(b, self.min_size)
            b, s = top_n_by_score(b[keep], s[keep], pre_n)
            cand_boxes.append(b)
            cand_scores.append(s)
            cand_image.append(torch.full_like(s, i, dtype=torch.int64))
        all_boxes = torch.cat(cand_boxes)
        all_scores = torch.cat(cand_scores).float()
        all_image = torch.cat(cand_image)
        # One NMS call for the whole batch; image index plays the role of the category.
        keep = batched_nms(all_boxes, all_scores, all_image, self.nms_thresh)
        kept_image = all_image[keep]
        out_boxes, out_scores = [], []
        for i in range(len(image_sizes)):
            sel = keep[kept_image == i][:post_n]  # batched_nms returns indices by decreasing score
            out_boxes.append(all_boxes[sel])
            out_scores.append(torch.sigmoid(all_scores[sel]))
        return out_boxes, out_scores

    # ---------------------------------------------------------------------------- training targets
    @torch.no_grad()
    def assign_targets(
        self, anchors: Tensor, image_sizes: Sequence[Sequence[int]], targets: Sequence[dict]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: labels LongTensor[N] (1 positive, 0 negative, -1 ignored) and matched gt boxes [N, 4].

        Matched gt boxes are meaningful only where the label is 1 (zeros elsewhere). Anchors inside a
        crowd region of ``targets[i]["crowd_boxes"]`` (see the class docstring) are labelled -1.
        """
        labels, matched, _ = self.match_anchors(anchors, image_sizes, targets)
        return labels, matched

    @torch.no_grad()
    def match_anchors(
        self, anchors: Tensor, image_sizes: Sequence[Sequence[int]], targets: Sequence[dict]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """:meth:`assign_targets` plus, per anchor, the index of its highest-IoU gt box ([N], -1 where the
        image has no gt or the anchor is not used): what selects a per-class head's class channel."""
        labels_out, matched_out, index_out = [], [], []
        for i, (image_hw, target) in enumerate(zip(image_sizes, targets)):
            gt = _target_boxes(target, i).to(device=anchors.device, dtype=anchors.dtype)
            if self.allowed_border >= 0:
                inside = boxes_inside_image(anchors, image_hw, self.allowed_border)
                inside_idx = torch.nonzero(inside).squeeze(1)
            else:
                inside_idx = torch.arange(anchors.shape[0], device=anchors.device)
            crowd = crowd_ignore_mask(anchors[inside_idx], _target_crowd_boxes(target, i), self.crowd_iof_thresh)
            labels = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
            nearest = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
            matched = torch.zeros_like(anchors)
            if gt.shape[0] == 0:
                labels[inside_idx] = 0
            else:
                iou = box_iou(gt, anchors[inside_idx])
                iou[:, crowd] = -1.0  # never positive, never a gt's best anchor (mmdetection's ignore_iof_thr)
                matches = self.matcher(iou)
                labels[inside_idx] = torch.where(
                    matches >= 0, 1, torch.where(matches == Matcher.BELOW_LOW_THRESHOLD, 0, -1)
                )
                matched[inside_idx] = gt[matches.clamp(min=0)]
                # A positive's own gt (low-quality matches may differ from the argmax); otherwise the nearest.
                nearest[inside_idx] = torch.where(matches >= 0, matches, iou.argmax(dim=0))
            labels[inside_idx[crowd]] = -1
            labels_out.append(labels)
            matched_out.append(matched)
            index_out.append(nearest)
        return labels_out, matched_out, index_out

    def compute_loss(
        self,
        objectness: Tensor,
        pred_deltas: Tensor,
        anchors: Tensor,
        labels: list[Tensor],
        matched_gt_boxes: list[Tensor],
        seeds: Sequence[int | None] | None = None,
    ) -> dict[str, Tensor]:
        """objectness [B, N] logits, pred_deltas [B, N, 4], anchors [N, 4] -> {"loss_rpn_cls", "loss_rpn_box"}.

        seeds: per-image sampling seeds (see :class:`BalancedSampler`), None = torch's global generator."""
        pos_masks, neg_masks = self.sampler(labels, seeds)
        pos = torch.stack(pos_masks)
        sampled = pos | torch.stack(neg_masks)
        # Guard against an empty sample (e.g. every anchor cross-boundary): losses are then 0, not NaN.
        num_sampled = sampled.sum().clamp(min=1).to(objectness.dtype)
        loss_cls = (
            F.binary_cross_entropy_with_logits(objectness[sampled], pos[sampled].to(objectness.dtype), reduction="sum")
            / num_sampled
        )
        reg_targets = self.box_coder.encode(
            torch.stack(matched_gt_boxes)[pos], anchors.expand(pos.shape[0], -1, -1)[pos]
        )
        loss_box = (
            F.smooth_l1_loss(pred_deltas[pos], reg_targets, beta=self.smooth_l1_beta, reduction="sum") / num_sampled
        )
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}

    # --------------------------------------------------------------------------------------- forward
    def _check_inputs(self, features: Tensor, image_sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        if not isinstance(features, Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"RegionProposalNetwork: features must be a tensor [B, C, h, w], got {shape}")
        if len(image_sizes) != features.shape[0]:
            raise ValueError(
                f"RegionProposalNetwork: got {len(image_sizes)} image_sizes for a batch of {features.shape[0]} "
                "feature maps"
            )
        return [check_image_hw(hw, f"image_sizes[{i}]") for i, hw in enumerate(image_sizes)]

    def predict(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """features [B, C, h, w] -> (objectness logits [B, N], deltas [B, N, 4], anchors [N, 4]), N = h * w * A."""
        logits, deltas, anchors = self.predict_per_class(features)
        if logits.shape[2] != 1:
            raise ValueError(
                f"RegionProposalNetwork: the head is in per-class form ({logits.shape[2]} classes); "
                "use detres.models.localization.per_class_rpn.PerClassRPN"
            )
        return logits[:, :, 0], deltas[:, :, 0], anchors

    def predict_per_class(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """features [B, C, h, w] -> (logits [B, N, K], deltas [B, N, K, 4], anchors [N, 4]); K = the head's classes."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(tuple(logits.shape[2:]), device=features.device)
        flat_logits, flat_deltas = self.head.flatten(logits, deltas)
        return flat_logits, flat_deltas, anchors

    @torch.no_grad()
    def _proposals(
        self,
        objectness: Tensor,
        pred_deltas: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[Sequence[int]],
        mode: str | None,
    ) -> list[Tensor]:
        batch = objectness.shape[0]
        boxes = self.box_coder.decode(pred_deltas.detach().reshape(-1, 4), anchors.repeat(batch, 1)).view(batch, -1, 4)
        return self.filter_proposals(boxes, objectness.detach(), image_sizes, mode=mode)[0]

    @torch.no_grad()
    def propose(
        self, features: Tensor, image_sizes: Sequence[Sequence[int]], *, mode: str | None = None
    ) -> list[Tensor]:
        """Proposals only (no losses, no gradient): per image detached boxes [Ni, 4], best first.

        ``mode`` "train" / "test" picks that phase's top-n values whatever ``self.training`` is (the
        alternating scheme trains Fast R-CNN on a frozen RPN's "train" proposals); None = by ``self.training``.
        """
        image_sizes = self._check_inputs(features, image_sizes)
        objectness, pred_deltas, anchors = self.predict(features)
        return self._proposals(objectness, pred_deltas, anchors, image_sizes, mode)

    @torch.no_grad()
    def propose_scored(
        self, features: Tensor, image_sizes: Sequence[Sequence[int]], *, mode: str | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`propose` with each proposal's objectness probability: per image (boxes [Ni, 4], scores [Ni]).

        What merging proposal sets (ensembles, pyramid proposals) ranks by.
        """
        image_sizes = self._check_inputs(features, image_sizes)
        objectness, pred_deltas, anchors = self.predict(features)
        batch = objectness.shape[0]
        boxes = self.box_coder.decode(pred_deltas.reshape(-1, 4), anchors.repeat(batch, 1)).view(batch, -1, 4)
        return self.filter_proposals(boxes, objectness, image_sizes, mode=mode)

    def forward(
        self,
        features: Tensor,
        image_sizes: Sequence[Sequence[int]],
        targets: Sequence[dict] | None = None,
        *,
        compute_proposals: bool = True,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """features [B, C, h, w]; image_sizes: valid (unpadded) (height, width) per image;
        targets: per image dict with "boxes" [Ni, 4] (required in training) and optionally
        "crowd_boxes" [Ci, 4].

        Returns (proposals: list of detached [Ni, 4] boxes, losses: dict, empty in eval mode).
        ``compute_proposals=False`` skips the proposals (an empty list is returned), e.g. when
        only the RPN losses are wanted.
        """
        image_sizes = self._check_inputs(features, image_sizes)
        batch = features.shape[0]
        if self.training:
            if targets is None:
                raise ValueError("RegionProposalNetwork: targets are required in training mode")
            if len(targets) != batch:
                raise ValueError(f"RegionProposalNetwork: got {len(targets)} targets for a batch of {batch} images")

        objectness, pred_deltas, anchors = self.predict(features)
        proposals: list[Tensor] = []
        if compute_proposals:
            proposals = self._proposals(objectness, pred_deltas, anchors, image_sizes, None)

        losses: dict[str, Tensor] = {}
        if self.training:
            labels, matched = self.assign_targets(anchors, image_sizes, targets)
            losses = self.compute_loss(objectness, pred_deltas, anchors, labels, matched, target_seeds(targets))
        return proposals, losses


def _target_boxes(target: dict, index: int) -> Tensor:
    """targets[index]["boxes"] validated as a float [N, 4] tensor."""
    if not isinstance(target, dict) or "boxes" not in target:
        raise ValueError(f"RegionProposalNetwork: targets[{index}] must be a dict with a 'boxes' entry")
    boxes = target["boxes"]
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"RegionProposalNetwork: targets[{index}]['boxes'] must have shape [N, 4], got {shape}")
    if boxes.numel() and not bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()):
        # A zero-size gt would give log(0) regression targets; datasets must drop such boxes.
        raise ValueError(f"RegionProposalNetwork: targets[{index}]['boxes'] contains boxes with x2 <= x1 or y2 <= y1")
    return boxes


def _target_crowd_boxes(target: dict, index: int) -> Tensor | None:
    """targets[index]["crowd_boxes"] validated as [C, 4], or None when the entry is absent."""
    crowd = target.get("crowd_boxes")
    if crowd is None:
        return None
    if not isinstance(crowd, Tensor) or crowd.ndim != 2 or crowd.shape[1] != 4:
        shape = tuple(crowd.shape) if isinstance(crowd, Tensor) else type(crowd).__name__
        raise ValueError(f"RegionProposalNetwork: targets[{index}]['crowd_boxes'] must have shape [C, 4], got {shape}")
    return crowd
