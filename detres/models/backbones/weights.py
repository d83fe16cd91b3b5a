"""Strict loading of external ResNet weights: torchvision state_dicts, legacy CIFAR checkpoints, our own checkpoints."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from detres.utils.torch_files import read_torch_file

StateDict = Mapping[str, Tensor]

# Always optional on either side: absent in pre-1.6 checkpoints, absent in FrozenBatchNorm2d models.
_OPTIONAL_SUFFIX = "num_batches_tracked"
_MAX_LISTED = 20


class StateDictMismatchError(ValueError):
    """A state_dict does not match the model key-for-key (missing/unexpected keys, wrong shapes)."""


def _format_keys(title: str, keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"  {title} ({len(keys)}): {shown}{more}"


def _read_weights(path: str | os.PathLike, *, mmap: bool = False) -> object:
    return read_torch_file(path, what="weights file", mmap=mmap)


def _strip_prefix(state_dict: StateDict, prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` (e.g. DataParallel's 'module.') when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _as_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{source}: expected a non-empty mapping of parameter name -> tensor, got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{source}: not a state_dict, entries that are not str -> Tensor: {bad[:_MAX_LISTED]}")
    return dict(obj)


def load_state_dict_strict(
    model: nn.Module,
    state_dict: StateDict,
    *,
    source: str = "state_dict",
    skip_prefixes: Sequence[str] = (),
) -> None:
    """Load ``state_dict`` into ``model`` key-for-key or raise StateDictMismatchError.

    ``num_batches_tracked`` entries may be absent on either side (the model keeps its own value
    when the file lacks them; they are dropped when the model has none, e.g. FrozenBatchNorm2d).
    Keys starting with one of ``skip_prefixes`` (e.g. "fc.") are ignored in both the file and the
    model, leaving those model tensors as they are. Nothing is loaded unless everything matches.
    """
    skip = tuple(skip_prefixes)
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(skip)}
    missing = sorted(k for k in target if k not in given and not k.endswith(_OPTIONAL_SUFFIX))
    unexpected = sorted(k for k in given if k not in target and not k.endswith(_OPTIONAL_SUFFIX))
    shapes = sorted(
        f"{k} (file {tuple(given[k].shape)} vs model {tuple(target[k].shape)})"
        for k in target
        if k in given and given[k].shape != target[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(model).__name__} key-for-key; nothing was loaded:"]
        if missing:
            lines.append(_format_keys("missing keys", missing))
        if unexpected:
            lines.append(_format_keys("unexpected keys", unexpected))
        if shapes:
            lines.append(_format_keys("shape mismatches", shapes))
        raise StateDictMismatchError("\n".join(lines))
    # Complete the optional/skipped entries from the model itself so load_state_dict can be strict.
    full = model.state_dict()
    merged = {k: given.get(k, full[k]) for k in full}
    model.load_state_dict(merged, strict=True)


def convert_cifar_checkpoint_keys(state_dict: StateDict) -> dict[str, Tensor]:
    """Legacy CIFAR ResNet keys -> ours: drop the DataParallel 'module.' prefix, 'linear.*' -> 'fc.*'."""
    out = {}
    for key, value in _strip_prefix(state_dict, "module.").items():
        out["fc." + key[len("linear.") :] if key.startswith("linear.") else key] = value
    return out


def detect_checkpoint_format(obj: object) -> str:
    """'detres' ({"model": state_dict, ...}), 'cifar_legacy' ({"state_dict": ...}) or 'state_dict'."""
    if isinstance(obj, Mapping):
        if "model" in obj and isinstance(obj["model"], Mapping):
            return "detres"
        if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            return "cifar_legacy"
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return "state_dict"
    found = sorted(map(str, obj.keys()))[:_MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(
        "unrecognised checkpoint format: expected a dict with 'model' (detres train_cls), "
        f"a dict with 'state_dict' (legacy CIFAR) or a plain state_dict; found {found}"
    )


def checkpoint_state_dict(obj: object, source: str) -> tuple[str, dict[str, Tensor]]:
    """(format, state_dict with our key names) of a loaded checkpoint of any of the three formats.

    See :func:`detect_checkpoint_format`; a 'module.' prefix on every key is stripped in all formats
    and legacy CIFAR keys are renamed ('linear' -> 'fc'). ``source`` names the file in errors.
    """
    try:
        fmt = detect_checkpoint_format(obj)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if fmt == "detres":
        return fmt, _strip_prefix(_as_state_dict(obj["model"], f"{source}['model']"), "module.")
    if fmt == "cifar_legacy":
        return fmt, convert_cifar_checkpoint_keys(_as_state_dict(obj["state_dict"], f"{source}['state_dict']"))
    return fmt, _strip_prefix(_as_state_dict(obj, source), "module.")


def load_pretrained_backbone(model: nn.Module, path: str | os.PathLike, *, skip_prefixes: Sequence[str] = ()) -> str:
    """Load pretrained weights from ``path`` into ``model``, detecting the file format; returns it.

    Formats: our train_cls checkpoint (dict with "model"), a legacy CIFAR checkpoint (dict with
    "state_dict"; 'module.' stripped, 'linear' -> 'fc'), or a plain (e.g. torchvision) state_dict.
    A 'module.' prefix on every key is stripped in all formats. Loading is strict; pass
    ``skip_prefixes=("fc.",)`` to keep the model's own classifier (e.g. a different class count).
    """
    source = str(path)
    fmt, state_dict = checkpoint_state_dict(_read_weights(path), source)
    load_state_dict_strict(model, state_dict, source=f"{source} ({fmt})", skip_prefixes=skip_prefixes)
    return fmt


class UnrecomputedBNError(ValueError):
    """A backbone checkpoint records that its BN statistics were not recomputed (Appendix A requires it)."""


def check_backbone_bn_statistics(path: str | os.PathLike, *, allow_unrecomputed_bn: bool = False) -> bool | None:
    """Refuse a detection backbone whose BN statistics were not recomputed; returns what the file records.

    ResNet paper, Appendix A: after pre-training the BN statistics are computed on the training set,
    then frozen for detection fine-tuning. Our train_cls checkpoints record this in ``bn_recomputed``:

    * ``True`` (``model_final.pt`` with ``bn_recompute.enabled``): accepted.
    * ``False`` (``last.pt``, or ``bn_recompute.enabled: false``): UnrecomputedBNError, a one-line
      message naming the file and ``model.allow_unrecomputed_bn``, unless ``allow_unrecomputed_bn``
      (then accepted with a warning).
    * not recorded (a torchvision / other external state_dict, a legacy CIFAR checkpoint, an older
      train_cls file): accepted with a warning that the statistics cannot be verified. Published
      ImageNet weights carry the running averages of training, the standard detection initialisation.

    Returns True / False / None (not recorded). Only the small metadata is read (tensors are mapped).
    """
    obj = _read_weights(path, mmap=True)
    try:
        fmt = detect_checkpoint_format(obj)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    recorded = obj.get("bn_recomputed") if fmt == "detres" else None
    if recorded is None:
        warnings.warn(
            f"{path}: the file does not record whether its BN statistics were recomputed on the training set "
            f"({fmt} format); they are frozen as found (Appendix A recomputes them first)",
            stacklevel=2,
        )
        return None
    if bool(recorded):
        return True
    if not allow_unrecomputed_bn:
        raise UnrecomputedBNError(
            f"{path}: backbone BN statistics were not recomputed (bn_recomputed=False; Appendix A recomputes them "
            "on the training set before freezing) - use a train_cls model_final.pt made with bn_recompute.enabled, "
            "or set model.allow_unrecomputed_bn=true to use it anyway"
        )
    warnings.warn(
        f"{path}: using a backbone whose BN statistics were not recomputed (model.allow_unrecomputed_bn=true)",
        stacklevel=2,
    )
    return False
