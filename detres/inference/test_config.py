"""The test-time configuration of a detector, one typed record read once: the post-processing (NMS kind, voting) and
the Appendix-B extras (box refinement, multi-scale, flip, ensemble merge), from a det config's ``test`` section and the
command line."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detres.models.detection.postprocess import NMS_METHODS, DetectionPostprocess, check_postprocess_values

__all__ = ["TestConfig", "add_test_arguments", "split_overrides"]

# post-processing of the first model, replaced where a TestConfig field is set (None: the model's own)
POSTPROCESS_OVERRIDES = ("nms_method", "soft_nms_sigma", "soft_nms_score_thresh", "voting", "voting_iou")


@dataclass(frozen=True)
class TestConfig:
    """How a detector (or an ensemble) is run at test time; all off = the model's own eval forward.

    nms_method, soft_nms_sigma, soft_nms_score_thresh, voting, voting_iou: the post-processing
        (:class:`DetectionPostprocess`); None = the first model's own (its config's ``model.roi_heads``).
    box_refinement: second pass on each region's regressed box, NMS on the union of both passes.
    multiscale: score RoIs on the image pyramid ``scales`` (shorter sides; longer side capped at
        ``scale * max_size_ratio``, None = the ratio of the model's test scale), maxout of the two levels
        bracketing ``reference_size``².
    pyramid_proposals: with ``multiscale``, also run the RPN on every level and merge the sets.
    flip: average the scores and boxes with those of the mirrored image.
    proposal_nms_thresh, max_proposals: how proposal sets are merged (ensembles, pyramid proposals);
        None = the first model's RPN test NMS threshold and post-NMS top-n.
    """

    __test__ = False  # not a pytest test class despite its name

    nms_method: str | None = None
    soft_nms_sigma: float | None = None
    soft_nms_score_thresh: float | None = None
    voting: bool | None = None
    voting_iou: float | None = None
    box_refinement: bool = False
    multiscale: bool = False
    scales: tuple[float, ...] = ()
    max_size_ratio: float | None = None
    reference_size: float | None = None
    pyramid_proposals: bool = False
    flip: bool = False
    proposal_nms_thresh: float | None = None
    max_proposals: int | None = None

    def __post_init__(self) -> None:
        try:
            check_postprocess_values(
                **{name: getattr(self, name) for name in POSTPROCESS_OVERRIDES if name != "voting"}
            )
        except ValueError as exc:
            raise ValueError(f"test config: {exc}") from None
        if any(float(s) <= 0 for s in self.scales) or (self.multiscale and len(self.scales) == 0):
            raise ValueError(f"test config: scales must be positive shorter sides, got {list(self.scales)}")
        ratio, reference = self.max_size_ratio, self.reference_size  # None: not set (reference: multiscale needs it)
        if ratio is not None and ratio < 1:
            raise ValueError(f"test config: max_size_ratio must be >= 1, got {ratio}")
        if self.multiscale if reference is None else reference <= 0:
            raise ValueError(f"test config: reference_size must be positive, got {reference}")
        if self.pyramid_proposals and not self.multiscale:
            raise ValueError("test config: pyramid_proposals needs multiscale")
        if self.proposal_nms_thresh is not None and not 0 < self.proposal_nms_thresh <= 1:
            raise ValueError(f"test config: proposal_nms_thresh must be in (0, 1], got {self.proposal_nms_thresh}")
        if self.max_proposals is not None and self.max_proposals < 1:
            raise ValueError(f"test config: max_proposals must be >= 1, got {self.max_proposals}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TestConfig:
        """From a det config's ``test`` section; the pyramid's longer-side cap keeps the ratio of the model's test
        scale (``max_size_ratio`` None). The post-processing is the model's own."""
        test = cfg["test"]
        ms, ensemble = test["multiscale"], test["ensemble"]
        return cls(
            box_refinement=bool(test["box_refinement"]),
            multiscale=bool(ms["enabled"]),
            scales=tuple(float(s) for s in ms["scales"]),
            reference_size=float(ms["reference_size"]),
            pyramid_proposals=bool(ms["pyramid_proposals"]),
            flip=bool(test["flip"]),
            proposal_nms_thresh=None
            if ensemble["proposal_nms_thresh"] is None
            else float(ensemble["proposal_nms_thresh"]),
            max_proposals=None if ensemble["max_proposals"] is None else int(ensemble["max_proposals"]),
        )

    def with_flags(self, args: argparse.Namespace) -> TestConfig:
        """This configuration with the :func:`add_test_arguments` flags that were given (None = keep).

        Raises ValueError naming the flag when the result is not a valid configuration.
        """
        changes: dict[str, Any] = {}
        for dest, (field, _) in _FLAG_FIELDS.items():
            value = getattr(args, dest, None)
            if value is not None:
                changes[field] = _floats(value, "--scales") if dest == "scales" else value
        try:
            return dataclasses.replace(self, **changes)
        except ValueError as exc:
            named = [flag for field, flag in _FLAG_FIELDS.values() if field in changes and f"{field} " in str(exc)]
            raise ValueError(f"{', '.join(named) or 'test-time flags'}: {exc}") from None

    def without_extras(self) -> TestConfig:
        """This configuration with every Appendix-B extra off (the pyramid settings kept for a flag to turn on)."""
        return dataclasses.replace(self, box_refinement=False, multiscale=False, pyramid_proposals=False, flip=False)

    @property
    def plain(self) -> bool:
        """True when nothing differs from the model's own eval forward (no extra, no post-processing override)."""
        extras = self.box_refinement or self.multiscale or self.flip
        return not extras and all(getattr(self, name) is None for name in POSTPROCESS_OVERRIDES)

    def postprocess_of(self, model_postprocess: DetectionPostprocess) -> DetectionPostprocess:
        """A model's post-processing with this configuration's overrides."""
        changes = {name: getattr(self, name) for name in POSTPROCESS_OVERRIDES if getattr(self, name) is not None}
        return dataclasses.replace(model_postprocess, **changes)


def add_test_arguments(parser: argparse.ArgumentParser, *, defaults: str = "the config's test section") -> None:
    """The test-time flags of test_det, infer and ablate_det; each overrides the configuration only when given."""
    post = parser.add_argument_group("post-processing (default: the checkpoint's model.roi_heads)")
    post.add_argument(
        "--nms-method",
        choices=NMS_METHODS,
        default=None,
        help="per-class NMS: nms (hard, the paper), soft_linear or soft_gaussian",
    )
    post.add_argument("--soft-nms-sigma", type=float, default=None, help="soft_gaussian's sigma")
    post.add_argument(
        "--soft-nms-score-thresh",
        type=float,
        default=None,
        help="soft-NMS drops boxes whose decayed score is not above this",
    )
    post.add_argument(
        "--box-voting",
        dest="voting",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Appendix-B box voting after NMS (--no-box-voting: off)",
    )
    post.add_argument("--box-voting-iou", dest="voting_iou", type=float, default=None, help="IoU at which a box votes")
    group = parser.add_argument_group(f"Appendix-B test-time extras (default: {defaults})")
    switch = argparse.BooleanOptionalAction
    group.add_argument(
        "--box-refinement", action=switch, default=None, help="second RoI pass on the regressed boxes, NMS on the union"
    )
    group.add_argument(
        "--multiscale", action=switch, default=None, help="score RoIs on an image pyramid, maxout of two levels"
    )
    group.add_argument(
        "--scales", nargs="+", default=None, metavar="N", help="pyramid shorter sides (with --multiscale)"
    )
    group.add_argument(
        "--reference-size", type=float, default=None, metavar="F", help="RoI side whose area picks the pyramid levels"
    )
    group.add_argument(
        "--pyramid-proposals", action=switch, default=None, help="with --multiscale, also run the RPN on every level"
    )
    group.add_argument("--flip", action=switch, default=None, help="average with the mirrored image's scores and boxes")
    group.add_argument(
        "--proposal-nms", type=float, default=None, metavar="F", help="NMS threshold when merging proposal sets"
    )
    group.add_argument("--max-proposals", type=int, default=None, metavar="N", help="proposals kept after merging sets")


# flag destination -> (TestConfig field, the flag)
_FLAG_FIELDS = {
    "nms_method": ("nms_method", "--nms-method"),
    "soft_nms_sigma": ("soft_nms_sigma", "--soft-nms-sigma"),
    "soft_nms_score_thresh": ("soft_nms_score_thresh", "--soft-nms-score-thresh"),
    "voting": ("voting", "--box-voting"),
    "voting_iou": ("voting_iou", "--box-voting-iou"),
    "box_refinement": ("box_refinement", "--box-refinement"),
    "multiscale": ("multiscale", "--multiscale"),
    "scales": ("scales", "--scales"),
    "reference_size": ("reference_size", "--reference-size"),
    "pyramid_proposals": ("pyramid_proposals", "--pyramid-proposals"),
    "flip": ("flip", "--flip"),
    "proposal_nms": ("proposal_nms_thresh", "--proposal-nms"),
    "max_proposals": ("max_proposals", "--max-proposals"),
}


def _floats(values: list[str], flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"{flag}: expected numbers, got {values}") from None


def split_overrides(values: list[str] | None, overrides: list[str]) -> tuple[list[str] | None, list[str]]:
    """Separate ``key=value`` config overrides that a ``nargs="+"`` option swallowed from its own values.

    ``--checkpoint a.pt b.pt data.val_ann=x.json`` parses the override as a third checkpoint; an entry is
    taken for an override when it has a ``=`` whose left side is a dotted name and is not an existing file.
    Returns (the option's values, the overrides: the swallowed ones first); None values stay None.
    """
    kept, moved = [], []
    for value in values or []:
        key = value.split("=", 1)[0]
        if "=" in value and key.replace(".", "").replace("_", "").isalnum() and not Path(value).exists():
            moved.append(value)
        else:
            kept.append(value)
    return (None if values is None else kept), [*moved, *overrides]
