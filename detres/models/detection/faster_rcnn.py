"""Faster R-CNN assembly on a ResNet-C4 (Appendix A) or VGG-16 backbone: normalise, pad, trunk, RPN, RoI heads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from detres.data.collate import pad_images
from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB
from detres.models.backbones.resnet_c4 import build_resnet_c4
from detres.models.backbones.vgg16_split import build_vgg16_c4
from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.context import ContextRoIHeads
from detres.models.detection.roi_heads import BoxHead, FastRCNNPredictor, RoIHeads, RoIPooler
from detres.models.detection.rpn import RegionProposalNetwork, RPNHead

__all__ = ["FasterRCNN", "build_faster_rcnn"]


def _per_channel(values: Sequence[float], name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != 3:
        raise ValueError(f"FasterRCNN: {name} must have 3 values (RGB), got {list(values)}")
    if name == "pixel_std" and bool((t <= 0).any()):
        raise ValueError(f"FasterRCNN: pixel_std must be positive, got {t.tolist()}")
    return t.view(3, 1, 1)


class FasterRCNN(nn.Module):
    """Faster R-CNN with one shared stride-16 feature map (C4) used by both the RPN and the RoI heads.

    Args:
        trunk: images [B,3,H,W] (normalised) -> C4 features [B,C,H/16,W/16].
        rpn: ``RegionProposalNetwork``-like: (features, image_sizes, targets) -> (proposals, losses).
        roi_heads: ``RoIHeads``-like: (features, proposals, image_sizes, targets) -> (detections, losses).
        pixel_mean: per-channel RGB mean on the 0..255 scale, subtracted from every input pixel.
            Use the value the classification backbone was trained with (the checkpoint's channel
            mean); the default is torchvision's ImageNet mean.
        pixel_std: per-channel divisor. (1, 1, 1) is the paper's / AlexNet's mean-subtraction-only
            practice; pass the ImageNet std (58.395, 57.12, 57.375) for torchvision-trained weights.
        size_divisibility: the padded batch's H and W are rounded up to a multiple of this (16 =
            the trunk stride, so feature cells align with anchors for every image in the batch).

    Inputs are 0..255 RGB images; padding is zero *after* normalisation (the mean colour).
    Training mode returns the dict of RPN and RoI-head losses; eval mode returns per image a dict
    ``boxes`` [D,4] (input-image pixels, clipped), ``scores`` [D], ``labels`` [D] (1..K).
    """

    def __init__(
        self,
        trunk: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        *,
        pixel_mean: Sequence[float] = IMAGENET_MEAN_RGB,
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        size_divisibility: int = 16,
    ) -> None:
        super().__init__()
        if int(size_divisibility) < 1:
            raise ValueError(f"FasterRCNN: size_divisibility must be >= 1, got {size_divisibility}")
        self.trunk = trunk
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.size_divisibility = int(size_divisibility)
        self.register_buffer("pixel_mean", _per_channel(pixel_mean, "pixel_mean"))
        self.register_buffer("pixel_std", _per_channel(pixel_std, "pixel_std"))

    def preprocess(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and zero-pad into one batch [B,3,Hp,Wp]; returns it with the valid (h, w) of each image.

        ``images``: a list of [3,H,W] tensors, or an already padded [B,3,H,W] tensor whose valid
        regions are given by ``image_sizes`` (default: the full tensor size), e.g. ``collate_detection``'s.
        Padding is done once: a list is normalised image by image and padded here (``pad_images``); a
        padded batch is normalised as a whole and only its padding is reset to 0 (the mean colour), the
        batch being extended only if its H or W is not yet a multiple of ``size_divisibility``.
        """
        device = self.pixel_mean.device
        div = self.size_divisibility
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            if images.shape[1] != 3:
                raise ValueError(f"FasterRCNN: batch must be [B,3,H,W], got {tuple(images.shape)}")
            batch_hw = (images.shape[2], images.shape[3])
            if image_sizes is None:
                image_sizes = [batch_hw] * images.shape[0]
            if len(image_sizes) != images.shape[0]:
                raise ValueError(f"FasterRCNN: {len(image_sizes)} image_sizes for a batch of {images.shape[0]} images")
            if images.shape[0] == 0:
                raise ValueError("FasterRCNN: got an empty batch of images")
            sizes = [(int(h), int(w)) for h, w in image_sizes]
            for i, (h, w) in enumerate(sizes):
                if not (0 < h <= batch_hw[0] and 0 < w <= batch_hw[1]):
                    raise ValueError(f"FasterRCNN: image_sizes[{i}]={(h, w)} does not fit the batch size {batch_hw}")
            if not images.is_floating_point():
                raise ValueError(f"FasterRCNN: images must be floating point (0..255 values), got {images.dtype}")
            batch = (images.to(device=device, dtype=torch.float32) - self.pixel_mean) / self.pixel_std
            # Extend only a batch not padded to the divisibility (e.g. a hand-made one); collate's already is.
            extra_h, extra_w = -batch_hw[0] % div, -batch_hw[1] % div
            if extra_h or extra_w:
                batch = F.pad(batch, (0, extra_w, 0, extra_h))
            for slot, (h, w) in zip(batch, sizes):
                slot[:, h:, :] = 0.0
                slot[:, :h, w:] = 0.0
            return batch, sizes
        if image_sizes is not None:
            raise ValueError("FasterRCNN: image_sizes is only accepted with a padded [B,3,H,W] batch tensor")
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = [images]
        if len(images) == 0:
            raise ValueError("FasterRCNN: got an empty list of images")
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
                shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"FasterRCNN: images[{i}] must be a float tensor [3,H,W] (RGB 0..255), got {shape}")
            if not img.is_floating_point():
                raise ValueError(f"FasterRCNN: images[{i}] must be floating point (0..255 values), got {img.dtype}")
        normalised = [(img.to(device=device, dtype=torch.float32) - self.pixel_mean) / self.pixel_std for img in images]
        sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
        return pad_images(normalised, div), sizes

    def _prepare(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]] | None,
        image_sizes: Sequence[Sequence[int]] | None,
    ) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict[str, torch.Tensor]] | None]:
        """Preprocessed batch, valid sizes, and the targets moved to the batch's device."""
        batch, sizes = self.preprocess(images, image_sizes)
        if targets is not None:
            if len(targets) != len(sizes):
                raise ValueError(f"FasterRCNN: got {len(targets)} targets for {len(sizes)} images")
            targets = [
                {k: (v.to(batch.device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets
            ]
        return batch, sizes, targets

    def forward(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training: dict of 4 losses (RPN cls/box, RoI cls/box). Eval: list of detection dicts.

        Targets: per image "boxes" [N,4], "labels" [N] (1..K), optionally "crowd_boxes" [C,4]
        (regions whose anchors / proposals are ignored in training, see the RPN and RoI heads).
        """
        if self.training and targets is None:
            raise ValueError("FasterRCNN: targets are required in training mode")
        batch, sizes, targets = self._prepare(images, targets, image_sizes)
        features = self.trunk(batch)
        proposals, rpn_losses = self.rpn(features, sizes, targets if self.training else None)
        detections, roi_losses = self.roi_heads(features, proposals, sizes, targets if self.training else None)
        if self.training:
            overlap = set(rpn_losses) & set(roi_losses)
            if overlap:
                raise ValueError(f"FasterRCNN: RPN and RoI heads both report losses named {sorted(overlap)}")
            return {**rpn_losses, **roi_losses}
        return detections

    # ------------------------------------------------------------- stage-wise passes (alternating training)
    def rpn_losses(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Trunk + RPN only: {"loss_rpn_cls", "loss_rpn_box"} (an RPN step of Ren et al.'s 4-step training).

        Needs training mode in the RPN; no proposals are made and the RoI heads are not run.
        """
        if not self.rpn.training:
            raise ValueError("FasterRCNN.rpn_losses: the RPN must be in training mode")
        batch, sizes, targets = self._prepare(images, targets, image_sizes)
        _, losses = self.rpn(self.trunk(batch), sizes, targets, compute_proposals=False)
        return losses

    @torch.no_grad()
    def propose(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        image_sizes: Sequence[Sequence[int]] | None = None,
        *,
        mode: str | None = "train",
    ) -> list[torch.Tensor]:
        """This network's RPN proposals per image (input-image pixels, detached), with the ``mode``
        ("train" / "test") top-n values: what a Fast R-CNN step of the 4-step training trains on."""
        batch, sizes, _ = self._prepare(images, None, image_sizes)
        return self.rpn.propose(self.trunk(batch), sizes, mode=mode)

    def detector_losses(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        image_sizes: Sequence[Sequence[int]] | None = None,
        *,
        proposals: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Trunk + RoI heads on fixed proposals: {"loss_cls", "loss_box_reg"} (a Fast R-CNN step).

        ``proposals``: per image [Ni,4] boxes in the same input-image pixels (e.g. another network's
        :meth:`propose`); None = this network's own RPN proposals ("train" top-n, no gradient), as in
        step 4, where the shared trunk and the RPN are frozen.
        """
        if not self.roi_heads.training:
            raise ValueError("FasterRCNN.detector_losses: the RoI heads must be in training mode")
        batch, sizes, targets = self._prepare(images, targets, image_sizes)
        features = self.trunk(batch)
        if proposals is None:
            proposals = self.rpn.propose(features.detach(), sizes, mode="train")
        elif len(proposals) != len(sizes):
            raise ValueError(f"FasterRCNN: got {len(proposals)} proposal sets for {len(sizes)} images")
        proposals = [p.detach().to(device=features.device, dtype=torch.float32) for p in proposals]
        _, losses = self.roi_heads(features, proposals, sizes, targets)
        return losses


def build_faster_rcnn(
    *,
    backbone: str = "resnet",
    depth: int = 50,
    num_classes: int,
    weights_path: str | Path | None = None,
    freeze_at: int = 2,
    stride_in_1x1: bool = False,
    base_width: int = 64,
    vgg_width: int = 64,
    vgg_hidden: int = 4096,
    frozen_bn: bool = True,
    pixel_mean: Sequence[float] = IMAGENET_MEAN_RGB,
    pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
    size_divisibility: int = 16,
    anchor_sizes: Sequence[float] = (128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    anchor_offset: float = 0.0,
    rpn_fg_iou_thresh: float = 0.7,
    rpn_bg_iou_thresh: float = 0.3,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    rpn_pre_nms_top_n_train: int = 12000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 6000,
    rpn_post_nms_top_n_test: int = 300,
    rpn_nms_thresh: float = 0.7,
    rpn_min_size: float = 0.0,
    rpn_allowed_border: float = 0,
    rpn_crowd_iof_thresh: float = 0.7,
    pooler_type: str = "roi_pool",
    pooler_resolution: int = 14,
    sampling_ratio: int = 0,
    class_agnostic_bbox: bool = False,
    roi_fg_iou_thresh: float = 0.5,
    roi_bg_iou_thresh_hi: float = 0.5,
    roi_bg_iou_thresh_lo: float = 0.1,
    roi_batch_size_per_image: int = 128,
    roi_positive_fraction: float = 0.25,
    bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.3,
    detections_per_img: int = 100,
    add_gt_as_proposals: bool = True,
    roi_crowd_iof_thresh: float = 0.7,
    global_context: bool = False,
    allow_unrecomputed_bn: bool = False,
) -> FasterRCNN:
    """Build a ResNet-C4 (or, ``backbone="vgg16"``, a VGG-16) Faster R-CNN from explicit arguments.

    ``backbone="vgg16"`` (Tables 7-8 baseline): :func:`detres.models.backbones.vgg16_split.build_vgg16_c4`, conv5_3
    shared, fc6/fc7 per region; needs ``pooler_resolution=7``; ``vgg_width`` (conv1 channels) and
    ``vgg_hidden`` (fc6/fc7 size) must match the checkpoint; ``depth``, ``base_width``, ``stride_in_1x1``,
    ``frozen_bn`` and ``allow_unrecomputed_bn`` are ignored (no BN).

    ``num_classes`` is the number of OBJECT classes K (e.g. 20 for VOC, 80 for COCO, i.e.
    ``len(dataset.categories)``); the predictor adds the background class itself (K+1 outputs).
    ``weights_path`` is a local classification checkpoint (None: random init); ``rpn_*`` go to
    :class:`RegionProposalNetwork`, ``roi_*`` and the rest to :class:`RoIHeads`.

    ``global_context`` (Appendix B): :class:`ContextRoIHeads`, whose predictor sees each region's
    conv5 vector concatenated with the whole-image context vector (``2 * head_dim`` inputs).

    With ``weights_path`` and frozen BN, a train_cls checkpoint that records ``bn_recomputed=False``
    is refused unless ``allow_unrecomputed_bn`` (Appendix A freezes *recomputed* statistics); files that
    record nothing (torchvision state_dicts) are accepted with a warning. See
    :func:`detres.models.backbones.weights.check_backbone_bn_statistics`.
    """
    if int(num_classes) < 1:
        raise ValueError(
            f"build_faster_rcnn: num_classes (object classes, background excluded) must be >= 1, got {num_classes}"
        )
    if backbone not in ("resnet", "vgg16"):
        raise ValueError(f"build_faster_rcnn: backbone must be 'resnet' or 'vgg16', got {backbone!r}")
    if backbone == "resnet" and weights_path is not None and frozen_bn and Path(weights_path).is_file():
        from detres.models.backbones.weights import check_backbone_bn_statistics

        check_backbone_bn_statistics(weights_path, allow_unrecomputed_bn=allow_unrecomputed_bn)
    if backbone == "vgg16":
        trunk, conv5_head, head_dim = build_vgg16_c4(
            weights_path=weights_path,
            freeze_at=freeze_at,
            pooler_resolution=pooler_resolution,
            width=vgg_width,
            hidden=vgg_hidden,
        )
    else:
        trunk, conv5_head, head_dim = build_resnet_c4(
            depth,
            weights_path=weights_path,
            freeze_at=freeze_at,
            stride_in_1x1=stride_in_1x1,
            frozen_bn=frozen_bn,
            base_width=base_width,
        )
    anchor_generator = AnchorGenerator(
        sizes=anchor_sizes, aspect_ratios=aspect_ratios, stride=trunk.stride, offset=anchor_offset
    )
    rpn = RegionProposalNetwork(
        anchor_generator,
        RPNHead(trunk.out_channels, anchor_generator.num_anchors_per_location()),
        fg_iou_thresh=rpn_fg_iou_thresh,
        bg_iou_thresh=rpn_bg_iou_thresh,
        batch_size_per_image=rpn_batch_size_per_image,
        positive_fraction=rpn_positive_fraction,
        pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        post_nms_top_n_train=rpn_post_nms_top_n_train,
        pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        post_nms_top_n_test=rpn_post_nms_top_n_test,
        nms_thresh=rpn_nms_thresh,
        min_size=rpn_min_size,
        allowed_border=rpn_allowed_border,
        crowd_iof_thresh=rpn_crowd_iof_thresh,
    )
    heads_class = ContextRoIHeads if global_context else RoIHeads
    predictor_in = 2 * head_dim if global_context else head_dim
    roi_heads = heads_class(
        RoIPooler(
            output_size=pooler_resolution,
            spatial_scale=1.0 / trunk.stride,
            pooler_type=pooler_type,
            sampling_ratio=sampling_ratio,
        ),
        BoxHead(conv5_head, out_features=head_dim),
        FastRCNNPredictor(predictor_in, int(num_classes) + 1, class_agnostic_bbox=class_agnostic_bbox),
        fg_iou_thresh=roi_fg_iou_thresh,
        bg_iou_thresh_hi=roi_bg_iou_thresh_hi,
        bg_iou_thresh_lo=roi_bg_iou_thresh_lo,
        batch_size_per_image=roi_batch_size_per_image,
        positive_fraction=roi_positive_fraction,
        bbox_reg_weights=bbox_reg_weights,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        add_gt_as_proposals=add_gt_as_proposals,
        crowd_iof_thresh=roi_crowd_iof_thresh,
    )
    return FasterRCNN(
        trunk, rpn, roi_heads, pixel_mean=pixel_mean, pixel_std=pixel_std, size_divisibility=size_divisibility
    )
