"""The localization task's records from the config's ``data`` section (ILSVRC or Tiny ImageNet layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detres.data.bad_samples import BadSamples
from detres.data.datasets.localization import (
    LocRecord,
    read_ilsvrc_loc,
    read_tiny_imagenet_train,
    read_tiny_imagenet_val_records,
    tiny_imagenet_synsets,
)
from detres.data.validate import check_loc_sets

__all__ = ["DATA_FORMATS", "load_loc_records", "synset_words"]

DATA_FORMATS = ("ilsvrc", "tiny_imagenet")


def load_loc_records(
    data_cfg: Any, *, bad_samples: BadSamples | None = None
) -> tuple[list[LocRecord], list[LocRecord], list[str]]:
    """(training records, validation records, synsets) of ``data.format`` under ``data.root``.

    ``bad_samples`` collects what ``data.on_bad_sample=skip`` drops (a fresh collector by default), for the
    trainers to list in their run folder (:func:`detres.data.bad_samples.write_skipped`)."""
    fmt, root = data_cfg["format"], Path(data_cfg["root"])
    if fmt not in DATA_FORMATS:
        raise ValueError(f"data.format must be one of {DATA_FORMATS}, got {fmt!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: folder not found: {root}")
    bad = bad_samples if bad_samples is not None else BadSamples(data_cfg.get("on_bad_sample", "error"))
    if fmt == "ilsvrc":
        train, synsets = read_ilsvrc_loc(
            root, data_cfg["train_split"], synsets_file=data_cfg["synsets"], bad_samples=bad
        )
        val, _ = read_ilsvrc_loc(root, data_cfg["val_split"], synsets, bad_samples=bad)
    else:
        synsets = tiny_imagenet_synsets(root)
        train = read_tiny_imagenet_train(root, synsets, bad_samples=bad)
        val = read_tiny_imagenet_val_records(root, synsets)
    if data_cfg["max_val_images"] is not None:
        val = val[: int(data_cfg["max_val_images"])]
    train, val = check_loc_sets(train, val, bad)
    return train, val, synsets


def synset_words(data_cfg: Any) -> dict[str, str]:
    """wnid -> words (``LOC_synset_mapping.txt`` / ``words.txt``), to match a classifier's class names."""
    root = Path(data_cfg["root"])
    path = root / ("LOC_synset_mapping.txt" if data_cfg["format"] == "ilsvrc" else "words.txt")
    if data_cfg["format"] == "ilsvrc" and data_cfg["synsets"]:
        path = Path(data_cfg["synsets"])
    if not path.is_file():
        return {}
    pairs = (line.split(None, 1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}
