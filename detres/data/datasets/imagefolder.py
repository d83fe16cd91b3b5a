"""Classification datasets: a `root/<class_name>/<image>` folder tree (ImageNet train / CIFAR layout),
or a flat image folder with a labels file (ImageNet / Tiny-ImageNet validation layout)."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from detres.data.image_io import read_image_rgb

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _normalize_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str) or len(extensions) == 0:
        raise ValueError(f"extensions: expected a non-empty sequence like ('.jpg', '.png'), got {extensions!r}")
    # A leading dot is optional for the caller; matching is case-insensitive (ImageNet ships .JPEG).
    return tuple(("." + e.lstrip(".")).lower() for e in extensions)


def _class_folders(root: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def _images_in(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    found = []
    # Walk subfolders too (some layouts nest images one level deeper); sorted for a stable order.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath) / name)
    return found


class _LabelledImages(Dataset):
    """What both layouts share: ``samples`` [(path, label)], ``targets``, ``classes``, ``class_to_idx``,
    lazy decoding and the optional ``transform``. Subclasses fill those in ``__init__``."""

    root: Path
    transform: Callable[[np.ndarray], Any] | None
    class_to_idx: dict[str, int]
    classes: list[str]
    samples: list[tuple[str, int]]
    targets: list[int]

    @property
    def class_names(self) -> list[str]:
        """Class names ordered by label (the same list as ``classes``)."""
        return list(self.classes)

    @property
    def num_classes(self) -> int:
        """Number of model outputs the labels index: max label + 1."""
        return max(self.class_to_idx.values()) + 1

    @property
    def paths(self) -> list[str]:
        """Image file paths in sample order (input for the pixel-mean and colour-PCA statistics)."""
        return [path for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = read_image_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root='{self.root}', num_images={len(self)}, "
            f"num_classes={len(self.classes)}, transform={self.transform!r})"
        )


class ImageFolderDataset(_LabelledImages):
    """Images in `root/<class>/...`, labelled by their class folder.

    Classes are the sorted names of the sub-folders of ``root`` and labels are their positions
    in that list (0..K-1). Two ways to evaluate on part of the classes:

    * ``classes=[...]``: keep only these folders, relabelled 0..len-1 in sorted name order.
    * ``class_to_idx={name: label}``: keep only these folders with exactly these labels, e.g.
      ``val = ImageFolderDataset(val_root, class_to_idx={c: train.class_to_idx[c] for c in subset})``
      so labels still index the outputs of a model trained on all classes.

    ``__getitem__(i)`` returns ``(transform(image), label)``; without a transform the image is the
    RGB uint8 array [H, W, 3]. Images are decoded lazily, so a corrupt file raises when it is read,
    naming the file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Callable[[np.ndarray], Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        classes: Sequence[str] | None = None,
        class_to_idx: Mapping[str, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.extensions = _normalize_extensions(extensions)
        if not self.root.exists():
            raise FileNotFoundError(f"ImageFolderDataset root: '{self.root}' does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"ImageFolderDataset root: '{self.root}' is not a directory")
        available = _class_folders(self.root)
        if not available:
            raise ValueError(f"ImageFolderDataset root: '{self.root}' has no class sub-folders")

        self.class_to_idx = self._resolve_classes(available, classes, class_to_idx)
        # Sorted by label so classes[label] is the class name when labels are contiguous.
        self.classes = sorted(self.class_to_idx, key=lambda c: (self.class_to_idx[c], c))

        self.samples: list[tuple[str, int]] = []
        for name in sorted(self.class_to_idx):
            files = _images_in(self.root / name, self.extensions)
            if not files:
                raise ValueError(
                    f"ImageFolderDataset: class folder '{self.root / name}' contains no images "
                    f"with extensions {self.extensions}"
                )
            label = self.class_to_idx[name]
            self.samples.extend((str(f), label) for f in files)
        self.targets: list[int] = [label for _, label in self.samples]

    def _resolve_classes(
        self,
        available: list[str],
        classes: Sequence[str] | None,
        class_to_idx: Mapping[str, int] | None,
    ) -> dict[str, int]:
        if classes is not None and class_to_idx is not None:
            raise ValueError("ImageFolderDataset: pass either classes or class_to_idx, not both")
        if class_to_idx is not None:
            wanted = list(class_to_idx)
        elif classes is not None:
            if isinstance(classes, str):
                raise ValueError(f"classes: expected a list of class folder names, got the string {classes!r}")
            wanted = sorted(set(classes))
        else:
            return {name: i for i, name in enumerate(available)}
        if not wanted:
            raise ValueError("ImageFolderDataset: the requested class list is empty")
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise ValueError(f"ImageFolderDataset: class folder(s) {missing} not found under '{self.root}'")
        if class_to_idx is None:
            return {name: i for i, name in enumerate(wanted)}
        mapping = {str(name): int(label) for name, label in class_to_idx.items()}
        bad = {name: label for name, label in mapping.items() if label < 0}
        if bad:
            raise ValueError(f"class_to_idx: labels must be >= 0, got {bad}")
        if len(set(mapping.values())) != len(mapping):
            raise ValueError(f"class_to_idx: two classes share a label in {mapping}")
        return mapping


def read_label_file(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """Lines ``<file name><whitespace><class name>[<whitespace>ignored...]`` -> [(line number, file, class)].

    Blank lines are skipped; extra columns (Tiny-ImageNet's box coordinates) are ignored. A line with
    fewer than two columns, or a file listed twice, raises ValueError naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: '{path}'")
    entries: list[tuple[int, str, str]] = []
    first_line: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"labels file '{path}' is not UTF-8 text: {exc}") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(
                f"{path}:{number}: expected '<file name> <class name> [...]' separated by whitespace, "
                f"got {line.rstrip()!r}"
            )
        name, class_name = fields[0], fields[1]
        if name in first_line:
            raise ValueError(f"{path}:{number}: '{name}' is listed twice (first on line {first_line[name]})")
        first_line[name] = number
        entries.append((number, name, class_name))
    if not entries:
        raise ValueError(f"labels file '{path}' lists no images")
    return entries


class ImageListDataset(_LabelledImages):
    """Images of a flat folder labelled by a labels file: the ImageNet / Tiny-ImageNet validation layout.

    Each line of ``labels_file`` is ``<file name> <class name> [extra columns ignored]`` with the
    file name relative to ``root`` (Tiny-ImageNet's ``val_annotations.txt``: ``val_0.JPEG n03444034
    0 32 44 62``; ImageNet val: ``ILSVRC2012_val_00000001.JPEG n01751748``).

    * ``class_to_idx={name: label}`` (the training set's mapping) gives the labels, so they index the
      outputs of the model trained on that set. Lines whose class is not in it are skipped and
      counted: ``skipped_classes`` {class: images}, ``num_skipped``; a warning reports them once.
      If no line names a known class, that is an error (e.g. a numeric-label file).
    * ``class_to_idx=None``: the classes are the sorted class names of the file, labelled 0..K-1.

    A listed file that does not exist raises FileNotFoundError naming the labels file, its line
    and the missing path (and how many are missing); images of ``root`` that are not listed are
    not used. Images are decoded lazily, as in ``ImageFolderDataset``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        labels_file: str | os.PathLike,
        *,
        class_to_idx: Mapping[str, int] | None = None,
        transform: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.labels_file = Path(labels_file)
        self.transform = transform
        if not self.root.exists():
            raise FileNotFoundError(f"ImageListDataset root: '{self.root}' does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"ImageListDataset root: '{self.root}' is not a directory")
        entries = read_label_file(self.labels_file)
        if class_to_idx is None:
            self.class_to_idx = {name: i for i, name in enumerate(sorted({c for _, _, c in entries}))}
        else:
            self.class_to_idx = {str(name): int(label) for name, label in class_to_idx.items()}
            if not self.class_to_idx:
                raise ValueError("ImageListDataset: class_to_idx is empty")
            if min(self.class_to_idx.values()) < 0 or len(set(self.class_to_idx.values())) != len(self.class_to_idx):
                raise ValueError(f"class_to_idx: labels must be distinct and >= 0, got {self.class_to_idx}")
        self.classes = sorted(self.class_to_idx, key=lambda c: (self.class_to_idx[c], c))

        skipped: Counter[str] = Counter()
        missing: list[tuple[int, Path]] = []
        self.samples = []
        for number, name, class_name in entries:
            label = self.class_to_idx.get(class_name)
            if label is None:
                skipped[class_name] += 1
                continue
            image_path = self.root / name
            if not image_path.is_file():
                missing.append((number, image_path))
                continue
            self.samples.append((str(image_path), label))
        if missing:
            number, image_path = missing[0]
            more = f" ({len(missing)} listed images are missing in all)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"{self.labels_file}:{number}: image '{image_path}' not found{more}")
        self.skipped_classes: dict[str, int] = dict(sorted(skipped.items()))
        self.num_skipped = sum(skipped.values())
        if not self.samples:
            known = sorted(self.class_to_idx)[:3]
            raise ValueError(
                f"{self.labels_file}: none of its {len(entries)} lines names a known class "
                f"(e.g. {entries[0][2]!r}; known classes are like {known}); the second column must be "
                f"the class name (folder name of the training set)"
            )
        if self.num_skipped:
            warnings.warn(
                f"{self.labels_file}: skipped {self.num_skipped} of {len(entries)} images whose class is not "
                f"among the {len(self.class_to_idx)} training classes: "
                + ", ".join(f"{c} ({n})" for c, n in self.skipped_classes.items()),
                stacklevel=2,
            )
        self.targets = [label for _, label in self.samples]
