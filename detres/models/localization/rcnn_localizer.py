"""The R-CNN stage of the ImageNet localizer (Appendix C): a whole classification ResNet on warped region crops with
two sibling per-class fc layers (cls, reg), trained RoI-centrically on the per-class RPN's proposals."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from detres.data.transforms.crop_warp import crop_and_warp, image_hw
from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB
from detres.models.backbones.frozen_bn import convert_frozen_batchnorm
from detres.models.detection.box_coder import BoxCoder
from detres.models.localization.rpn_localizer import RPNLocalizer, loc_backbone_kwargs
from detres.structures.boxes import clip_boxes
from detres.utils.torch_files import load_checkpoint, save_checkpoint

__all__ = [
    "CROP_SOURCES",
    "RCNNLocalizer",
    "RPNRCNNLocalizer",
    "assign_rcnn_targets",
    "build_rcnn_localizer",
    "load_rcnn_localizer",
    "load_rpn_rcnn_localizer",
    "rcnn_localizer_kwargs_from_config",
    "rcnn_losses",
    "save_rcnn_localizer",
]

RCNN_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Fast R-CNN's per-class regression weights


def assign_rcnn_targets(
    proposals: Tensor, proposal_classes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, *, fg_iou_thresh: float = 0.5
) -> tuple[Tensor, Tensor]:
    """R-CNN labels of class-dependent proposals: (labels [N] in 0..K, matched gt boxes [N,4]).

    A proposal of class c (1..K) is labelled c when its best IoU with a ground-truth box *of class c* is
    >= ``fg_iou_thresh`` (0.5), and 0 (background) otherwise; its matched box is that best gt box (the proposal
    itself for background rows, never used: no regression loss on background).
    """
    proposals, gt_boxes = proposals.float(), gt_boxes.float().reshape(-1, 4).to(proposals.device)
    proposal_classes, gt_labels = proposal_classes.long(), gt_labels.long().reshape(-1).to(proposals.device)
    labels, matched = proposal_classes.new_zeros(proposals.shape[0]), proposals.clone()
    if proposals.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return labels, matched
    iou = box_iou(proposals, gt_boxes)
    iou[proposal_classes[:, None] != gt_labels[None, :]] = -1.0  # only the proposal's own class counts
    best, index = iou.max(dim=1)
    fg = best >= float(fg_iou_thresh)
    labels[fg] = proposal_classes[fg]
    matched[fg] = gt_boxes[index[fg]]
    return labels, matched


def rcnn_losses(
    cls_logits: Tensor,
    deltas: Tensor,
    rois: Tensor,
    labels: Tensor,
    matched_boxes: Tensor,
    *,
    box_coder: BoxCoder,
    smooth_l1_beta: float = 1.0,
) -> dict[str, Tensor]:
    """Fast R-CNN losses of N regions: softmax cross-entropy over K+1 (mean) and smooth-L1 on the foreground rows'
    own-class deltas (sum / N, so a batch with few positives does not blow the box loss up)."""
    loss_cls = F.cross_entropy(cls_logits, labels)
    fg = torch.nonzero(labels > 0).flatten()
    if fg.numel() == 0:
        return {"loss_rcnn_cls": loss_cls, "loss_rcnn_box": deltas.sum() * 0.0}
    cols = 4 * (labels[fg, None] - 1) + torch.arange(4, device=deltas.device)
    targets = box_coder.encode(matched_boxes[fg], rois[fg])
    loss_box = F.smooth_l1_loss(deltas[fg[:, None], cols], targets, beta=smooth_l1_beta, reduction="sum")
    return {"loss_rcnn_cls": loss_cls, "loss_rcnn_box": loss_box / max(labels.shape[0], 1)}


SCORE_FUSIONS = ("rcnn", "product")  # how the test-time box score combines the R-CNN and RPN scores
# where the R-CNN crops its regions: the image at its own resolution (the paper's RoI-centric crops), or the RPN's
# (usually smaller) test view of it
CROP_SOURCES = ("image", "view")


class RCNNLocalizer(nn.Module):
    """conv1..conv5 + global average pool of an ImageNet ResNet, then two sibling fc layers in per-class form:

    * cls: K+1-way softmax (background + K classes), as R-CNN / Fast R-CNN. The paper says only "per-class"; a
      softmax makes the classes of one region compete, and its background row is what down-weights the RPN's
      poorly placed proposals.
    * reg: 4K outputs, a box regressor per class (class-major, BoxCoder weights (10, 10, 5, 5), relative to the RoI;
      the parameterisation is scale-invariant, so deltas in warped-crop pixels are deltas in image pixels).

    ``crop_source`` "image": regions are cropped from the image at its own resolution (the RPN's proposals are mapped
    there from its test view); "view": from the RPN's test view itself.

    ``forward(crops [N,3,S,S], normalised by :meth:`warp`) -> (cls_logits [N,K+1], deltas [N,4K])``.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        feature_dim: int,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        crop_size: int = 224,
        context_padding: float = 0.0,
        fg_iou_thresh: float = 0.5,
        bbox_reg_weights: Sequence[float] = RCNN_BOX_WEIGHTS,
        smooth_l1_beta: float = 1.0,
        crop_source: str = "image",
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"RCNNLocalizer: num_classes must be >= 1, got {num_classes}")
        if crop_source not in CROP_SOURCES:
            raise ValueError(f"RCNNLocalizer: crop_source must be one of {CROP_SOURCES}, got {crop_source!r}")
        self.crop_source = crop_source
        self.body = body
        self.num_classes = int(num_classes)
        self.cls_score = nn.Linear(int(feature_dim), self.num_classes + 1)
        self.bbox_pred = nn.Linear(int(feature_dim), 4 * self.num_classes)
        # Fast R-CNN's initialisation: small random fc weights, zero biases
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.crop_size, self.context_padding = int(crop_size), float(context_padding)
        self.fg_iou_thresh, self.smooth_l1_beta = float(fg_iou_thresh), float(smooth_l1_beta)
        self.box_coder = BoxCoder(bbox_reg_weights)

    def warp(self, image: np.ndarray | Tensor, rois: Tensor) -> Tensor:
        """The network's input for ``rois`` [N,4] of one image (0..255 RGB): normalised crops [N,3,S,S]."""
        device = self.cls_score.weight.device
        return crop_and_warp(
            image,
            rois.detach().float().cpu(),
            self.crop_size,
            self.context_padding,
            pixel_mean=self.pixel_mean,
            pixel_std=self.pixel_std,
        ).to(device)

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.flatten(self.body(crops), 1)
        return self.cls_score(features), self.bbox_pred(features)

    def losses(self, crops: Tensor, rois: Tensor, labels: Tensor, matched_boxes: Tensor) -> dict[str, Tensor]:
        """Training losses of N regions, given their R-CNN labels (0..K) and matched gt boxes
        (:func:`assign_rcnn_targets`)."""
        cls_logits, deltas = self(crops)
        device = cls_logits.device
        return rcnn_losses(
            cls_logits,
            deltas,
            rois.to(device),
            labels.to(device),
            matched_boxes.to(device),
            box_coder=self.box_coder,
            smooth_l1_beta=self.smooth_l1_beta,
        )

    @torch.no_grad()
    def score_and_refine(self, crops: Tensor, rois: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """Per region i: (softmax probability of class ``classes[i]`` (1..K), the RoI regressed by that class's
        deltas [4], in the RoIs' pixels, not clipped)."""
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        if classes.numel() and (int(classes.min()) < 1 or int(classes.max()) > self.num_classes):
            raise ValueError(f"score_and_refine: classes must lie in 1..{self.num_classes}")
        cls_logits, deltas = self(crops)
        classes, rois = classes.to(cls_logits.device), rois.to(cls_logits.device).float()
        rows = torch.arange(classes.shape[0], device=cls_logits.device)
        scores = F.softmax(cls_logits, dim=1)[rows, classes]
        cols = 4 * (classes[:, None] - 1) + torch.arange(4, device=deltas.device)
        return scores, self.box_coder.decode(deltas[rows[:, None], cols], rois)

    @torch.no_grad()
    def refine_class_boxes(
        self,
        image: np.ndarray | Tensor,
        proposals: Mapping[int, tuple[Tensor, Tensor]],
        *,
        chunk: int = 256,
        score_fusion: str = "rcnn",
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Test time: each class's RPN proposals (class 1..K -> (boxes [n,4], RPN scores [n])) rescored by the
        R-CNN's probability of that class and moved by its regressor; per class (boxes [n,4] clipped to the image,
        scores [n]), best first. Regions go through the network ``chunk`` at a time (224² crops are large).
        ``score_fusion``: "rcnn" (the paper: the R-CNN's probability) or "product" (times the RPN's score)."""
        if score_fusion not in SCORE_FUSIONS:
            raise ValueError(f"score_fusion must be one of {SCORE_FUSIONS}, got {score_fusion!r}")
        classes = sorted(proposals)
        rois = torch.cat(
            [proposals[c][0].detach().float().cpu().reshape(-1, 4) for c in classes] or [torch.zeros(0, 4)]
        )
        owners = torch.cat(
            [torch.full((proposals[c][0].shape[0],), c, dtype=torch.long) for c in classes]
            or [torch.zeros(0, dtype=torch.long)]
        )
        keep = (rois[:, 2] > rois[:, 0]) & (rois[:, 3] > rois[:, 1])  # a box clipped to nothing cannot be warped
        scores, boxes = torch.zeros(rois.shape[0]), rois.clone()
        for start in range(0, int(keep.sum()), max(int(chunk), 1)):
            rows = torch.nonzero(keep).flatten()[start : start + max(int(chunk), 1)]
            s, b = self.score_and_refine(self.warp(image, rois[rows]), rois[rows], owners[rows])
            scores[rows], boxes[rows] = s.cpu(), b.cpu()
        boxes = clip_boxes(boxes, image_hw(image))
        if score_fusion == "product":
            scores = scores * torch.cat(
                [proposals[c][1].detach().float().cpu().reshape(-1) for c in classes] or [torch.zeros(0)]
            )
        out = {}
        for c in classes:
            mine = torch.nonzero(owners == c).flatten()
            order = mine[torch.argsort(scores[mine], descending=True)]
            out[c] = (boxes[order], scores[order])
        return out


class RPNRCNNLocalizer(nn.Module):
    """Appendix C's test: the per-class RPN's top proposals of each requested class, rescored and moved by the
    R-CNN. Has the RPN localizer's ``class_boxes`` signature, so the RPN stage's test code runs it unchanged."""

    def __init__(self, rpn: RPNLocalizer, rcnn: RCNNLocalizer, *, score_fusion: str = "rcnn") -> None:
        super().__init__()
        if score_fusion not in SCORE_FUSIONS:
            raise ValueError(f"score_fusion must be one of {SCORE_FUSIONS}, got {score_fusion!r}")
        self.rpn, self.rcnn, self.score_fusion = rpn, rcnn, score_fusion

    @property
    def wants_source_image(self) -> bool:
        """True when :meth:`class_boxes` should be given the full-resolution image (``source``)."""
        return self.rcnn.crop_source == "image"

    @torch.no_grad()
    def class_boxes(
        self,
        image: Tensor,
        classes: Sequence[int],
        *,
        top_n: int = 200,
        nms_thresh: float | None = None,
        source: tuple[np.ndarray, Any] | None = None,
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Boxes and scores per class, in the pixels of ``image`` (the RPN's test view). ``source`` = (the image at
        its own resolution [H,W,3], the view's mapping: view x = x * sx - left, y = y * sy - top): the R-CNN then
        crops the proposals from it (``crop_source: image``)."""
        proposals = self.rpn.class_boxes(image, classes, top_n=top_n, nms_thresh=nms_thresh)
        if source is None or not self.wants_source_image:
            return self.rcnn.refine_class_boxes(image, proposals, score_fusion=self.score_fusion)
        original, view = source
        scale = torch.tensor([view.sx, view.sy, view.sx, view.sy], dtype=torch.float32)
        offset = torch.tensor([view.left, view.top, view.left, view.top], dtype=torch.float32)
        in_image = {c: ((b.cpu().float() + offset) / scale, s) for c, (b, s) in proposals.items()}
        refined = self.rcnn.refine_class_boxes(original, in_image, score_fusion=self.score_fusion)
        return {c: (b * scale - offset, s) for c, (b, s) in refined.items()}


def _resnet_body(
    depth: int,
    *,
    base_width: int,
    stride_in_1x1: bool,
    weights_path: str | os.PathLike | None,
    freeze_at: int,
    frozen_bn: bool,
) -> nn.Module:
    """An ImageNet ResNet whose ``forward`` ends at the global average pool (its fc is replaced by the heads)."""
    from detres.models.backbones.resnet import build_resnet
    from detres.models.backbones.weights import load_pretrained_backbone

    if freeze_at not in (0, 1, 2):
        raise ValueError(f"freeze_at must be 0, 1 or 2, got {freeze_at!r}")
    resnet = build_resnet(int(depth), base_width=int(base_width), stride_in_1x1=bool(stride_in_1x1))
    if weights_path is not None:
        load_pretrained_backbone(resnet, weights_path, skip_prefixes=("fc.",))
    resnet.fc = nn.Identity()
    if frozen_bn:  # Appendix A: statistics recomputed after pre-training, then fixed
        resnet = convert_frozen_batchnorm(resnet)
    frozen = [resnet.conv1, resnet.bn1][: 2 if freeze_at >= 1 else 0] + ([resnet.layer1] if freeze_at >= 2 else [])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return resnet


def build_rcnn_localizer(
    *,
    num_classes: int,
    depth: int = 101,
    base_width: int = 64,
    stride_in_1x1: bool = False,
    weights_path: str | os.PathLike | None = None,
    freeze_at: int = 2,
    frozen_bn: bool = True,
    pixel_mean: Sequence[float] = IMAGENET_MEAN_RGB,
    pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
    crop_size: int = 224,
    context_padding: float = 0.0,
    fg_iou_thresh: float = 0.5,
    bbox_reg_weights: Sequence[float] = RCNN_BOX_WEIGHTS,
    smooth_l1_beta: float = 1.0,
    crop_source: str = "image",
) -> RCNNLocalizer:
    """An :class:`RCNNLocalizer` from explicit arguments; ``weights_path`` is a train_cls checkpoint (fc unused)."""
    body = _resnet_body(
        depth,
        base_width=base_width,
        stride_in_1x1=stride_in_1x1,
        weights_path=weights_path,
        freeze_at=int(freeze_at),
        frozen_bn=bool(frozen_bn),
    )
    return RCNNLocalizer(
        body,
        feature_dim=body.out_channels,
        num_classes=num_classes,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        crop_size=crop_size,
        context_padding=context_padding,
        fg_iou_thresh=fg_iou_thresh,
        bbox_reg_weights=bbox_reg_weights,
        smooth_l1_beta=smooth_l1_beta,
        crop_source=crop_source,
    )


def rcnn_localizer_kwargs_from_config(model_cfg: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """Explicit arguments of :func:`build_rcnn_localizer` from a ``task: loc`` config's ``model`` tree."""
    rcnn = model_cfg["rcnn"]
    if rcnn["crop_source"] not in CROP_SOURCES:
        raise ValueError(f"model.rcnn.crop_source: must be one of {CROP_SOURCES}, got {rcnn['crop_source']!r}")
    return {
        "num_classes": int(num_classes),
        **loc_backbone_kwargs(model_cfg),
        "crop_size": int(rcnn["crop_size"]),
        "context_padding": float(rcnn["context_padding"]),
        "fg_iou_thresh": float(rcnn["fg_iou_thresh"]),
        "bbox_reg_weights": [float(w) for w in rcnn["bbox_reg_weights"]],
        "smooth_l1_beta": float(rcnn["smooth_l1_beta"]),
        "crop_source": str(rcnn["crop_source"]),
    }


def rcnn_localizer_payload(
    model: RCNNLocalizer, model_args: Mapping[str, Any], meta: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """The contents of an R-CNN-stage checkpoint (``stage: rcnn``); ``extra`` adds e.g. iter, config, optimizer."""
    return {
        "model": model.state_dict(),
        "model_args": dict(model_args, weights_path=None),
        "meta": dict(meta),
        "stage": "rcnn",
        **extra,
    }


def save_rcnn_localizer(
    path: str | os.PathLike, model: RCNNLocalizer, model_args: Mapping[str, Any], meta: Mapping[str, Any], **extra: Any
) -> None:
    """Write :func:`rcnn_localizer_payload` to ``path`` (atomically)."""
    save_checkpoint(path, rcnn_localizer_payload(model, model_args, meta, **extra))


def load_rcnn_localizer(
    path: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> tuple[RCNNLocalizer, dict[str, Any]]:
    """Rebuild an R-CNN-stage checkpoint's network (eval mode); returns (model, metadata incl. config, iter)."""
    state = load_checkpoint(path)
    missing = [key for key in ("model", "model_args", "meta") if key not in state]
    if missing or state.get("stage") != "rcnn":
        raise ValueError(f"{path}: not a train_loc R-CNN-stage checkpoint (missing {missing or ['stage=rcnn']})")
    model = build_rcnn_localizer(**dict(state["model_args"], weights_path=None))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), dict(state["meta"], config=state.get("config"), iter=state.get("iter"))


def load_rpn_rcnn_localizer(
    path: str | os.PathLike, *, score_fusion: str = "rcnn", device: torch.device | str = "cpu"
) -> tuple[RPNRCNNLocalizer, dict[str, Any]]:
    """An R-CNN-stage checkpoint with the RPN-stage checkpoint it was trained on (recorded as ``rpn_checkpoint``)
    as one :class:`RPNRCNNLocalizer` in eval mode; returns (model, the R-CNN checkpoint's metadata)."""
    from detres.models.localization.rpn_localizer import load_localizer

    rcnn, meta = load_rcnn_localizer(path, device=device)
    rpn_path = meta.get("rpn_checkpoint")
    if not rpn_path or not os.path.isfile(rpn_path):
        raise FileNotFoundError(f"{path}: its RPN-stage checkpoint {rpn_path!r} (model.rcnn.rpn_checkpoint) is missing")
    rpn, rpn_meta = load_localizer(rpn_path, device=device)
    if list(rpn_meta["synsets"]) != list(meta["synsets"]):
        raise ValueError(f"{path} and its RPN {rpn_path} were trained on different synsets")
    return RPNRCNNLocalizer(rpn, rcnn, score_fusion=score_fusion).to(device).eval(), meta
