"""Faster R-CNN assembly on a ResNet-C4 (Appendix A) or VGG-16 backbone: normalise, pad, trunk, RPN, RoI heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from detres.data.collate import pad_images
from detres.models.backbones.backbone_config import model_normalization, trunk_from_config
from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.box_head import BoxHead, FastRCNNPredictor
from detres.models.detection.context import ContextRoIHeads
from detres.models.detection.roi_heads import RoIHeads
from detres.models.detection.roi_pooler import RoIPooler
from detres.models.detection.rpn import RegionProposalNetwork
from detres.models.detection.rpn_head import RPNHead

__all__ = ["FasterRCNN"]


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
        pixel_mean: per-channel RGB mean on the 0..255 scale, subtracted from every input pixel: the value
            the classification backbone was trained with (:func:`model_normalization`).
        pixel_std: per-channel divisor. (1, 1, 1) is the paper's / AlexNet's mean-subtraction-only
            practice; the ImageNet std (58.395, 57.12, 57.375) for torchvision-trained weights.
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
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
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

    @classmethod
    def from_config(
        cls,
        model_cfg: Mapping[str, Any],
        *,
        num_classes: int,
        load_weights: bool = True,
        frozen_bn: bool = True,
        class_agnostic_bbox: bool = False,
    ) -> FasterRCNN:
        """The detector of a ``task: det`` config's ``model`` tree; each part reads its own sub-tree.

        ``num_classes`` counts OBJECT classes K (``len(dataset.categories)``); the predictor adds background.
        ``load_weights``: initialise the backbone from ``model.weights`` (checked against the config, BN
        statistics included); False builds the same network for a checkpoint's state_dict to fill.
        ``frozen_bn`` (ResNet only): False keeps trainable BN, for from-scratch toys. With
        ``model.roi_heads.global_context`` the heads are :class:`ContextRoIHeads` (Appendix B), whose
        predictor takes ``[region | context]`` vectors.
        """
        if int(num_classes) < 1:
            raise ValueError(
                f"FasterRCNN: num_classes (object classes, background excluded) must be >= 1, got {num_classes}"
            )
        roi_cfg = model_cfg["roi_heads"]
        trunk, conv5_head, head_dim = trunk_from_config(
            model_cfg,
            pooler_resolution=int(roi_cfg["pooler_resolution"]),
            load_weights=load_weights,
            frozen_bn=frozen_bn,
        )
        anchor_generator = AnchorGenerator.from_config(model_cfg, stride=trunk.stride)
        rpn = RegionProposalNetwork.from_config(
            model_cfg["rpn"],
            anchor_generator=anchor_generator,
            head=RPNHead(trunk.out_channels, anchor_generator.num_anchors_per_location()),
        )
        heads_class = ContextRoIHeads if roi_cfg["global_context"] else RoIHeads
        roi_heads = heads_class.from_config(
            roi_cfg,
            pooler=RoIPooler.from_config(roi_cfg, spatial_scale=1.0 / trunk.stride),
            box_head=BoxHead(conv5_head, out_features=head_dim),
            predictor=FastRCNNPredictor.from_config(
                roi_cfg, in_features=head_dim, num_classes=int(num_classes) + 1, class_agnostic_bbox=class_agnostic_bbox
            ),
        )
        mean, std = model_normalization(model_cfg, load_weights=load_weights)
        return cls(trunk, rpn, roi_heads, pixel_mean=mean, pixel_std=std)

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
        if not self.training:
            return self.detect(batch, sizes)
        features = self.trunk(batch)
        proposals, rpn_losses = self.rpn(features, sizes, targets)
        _, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        overlap = set(rpn_losses) & set(roi_losses)
        if overlap:
            raise ValueError(f"FasterRCNN: RPN and RoI heads both report losses named {sorted(overlap)}")
        return {**rpn_losses, **roi_losses}

    def detect(self, batch: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """The eval forward from a normalised, padded batch [B,3,Hp,Wp] and each image's valid (h, w): trunk, RPN
        proposals, RoI heads' detections per image (input-image pixels). What export traces, with the sizes of a
        traced image (0-dim tensors): every step keeps them traced, so the exported model takes any image size."""
        features = self.trunk(batch)
        proposals, _ = self.rpn(features, image_sizes)
        detections, _ = self.roi_heads(features, proposals, image_sizes)
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
