"""Per-image random sampling of a fixed-size mini-batch with a capped fraction of positives."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BalancedSampler", "target_seeds"]


def target_seeds(targets: Sequence[dict] | None) -> list[int | None] | None:
    """Each target's ``"seed"`` (None where absent): training loops put one there per image and
    iteration so that sampling does not depend on torch's global generator (exact resume, DDP)."""
    if targets is None:
        return None
    seeds = [t.get("seed") if isinstance(t, dict) else None for t in targets]
    return None if all(s is None for s in seeds) else seeds


class BalancedSampler:
    """Sample up to ``batch_size_per_image`` examples per image, at most ``positive_fraction`` positive.

    Labels: >= 1 positive (so class labels work too), 0 negative, < 0 ignored (never sampled).
    Negatives fill the rest of the batch; when either kind runs short, the batch is simply smaller
    (as in Faster R-CNN, positives do not fill in for missing negatives). Randomness comes from
    ``generator`` or, by default, torch's global generator, so ``torch.manual_seed`` makes it repeatable;
    an image given a seed in ``__call__(..., seeds=...)`` draws from a generator seeded by
    (that seed, ``stream``) instead, so its sample depends on nothing else (not on the other images
    of the batch, the process or what was drawn before). Two samplers with different ``stream``
    values (the RPN's and the RoI head's) draw independently from one image seed.
    """

    def __init__(
        self,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        generator: torch.Generator | None = None,
        stream: int = 0,
    ) -> None:
        if int(batch_size_per_image) <= 0:
            raise ValueError(f"BalancedSampler: batch_size_per_image must be positive, got {batch_size_per_image}")
        if not 0.0 <= float(positive_fraction) <= 1.0:
            raise ValueError(f"BalancedSampler: positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.generator = generator
        self.stream = int(stream)

    def _image_generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return self.generator
        mixed = int(np.random.SeedSequence([int(seed), self.stream]).generate_state(1, dtype=np.uint64)[0])
        return torch.Generator().manual_seed(mixed)

    def _choose(self, candidates: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
        """Bool mask with ``count`` randomly chosen True entries among the True entries of ``candidates``."""
        idx = torch.nonzero(candidates).squeeze(1)
        if idx.numel() > count:
            # randperm on CPU keeps the stream identical across devices for a given seed.
            perm = torch.randperm(idx.numel(), generator=generator)[:count].to(idx.device)
            idx = idx[perm]
        mask = torch.zeros_like(candidates)
        mask[idx] = True
        return mask

    def __call__(
        self, matched_labels: list[Tensor], seeds: Sequence[int | None] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """matched_labels: one 1-D LongTensor per image -> (pos_masks, neg_masks), BoolTensors of the same shapes.

        seeds: optional per-image seeds (None entries use ``generator``), see the class docstring."""
        if seeds is not None and len(seeds) != len(matched_labels):
            raise ValueError(f"BalancedSampler: got {len(seeds)} seeds for {len(matched_labels)} images")
        pos_masks: list[Tensor] = []
        neg_masks: list[Tensor] = []
        max_pos = int(self.batch_size_per_image * self.positive_fraction)
        for i, labels in enumerate(matched_labels):
            if not isinstance(labels, Tensor) or labels.ndim != 1:
                shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
                raise ValueError(f"BalancedSampler: matched_labels[{i}] must be a 1-D tensor, got {shape}")
            positive = labels >= 1
            negative = labels == 0
            num_pos = min(int(positive.sum()), max_pos)
            num_neg = min(int(negative.sum()), self.batch_size_per_image - num_pos)
            generator = self._image_generator(None if seeds is None else seeds[i])
            pos_masks.append(self._choose(positive, num_pos, generator))
            neg_masks.append(self._choose(negative, num_neg, generator))
        return pos_masks, neg_masks
