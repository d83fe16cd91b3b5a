"""Classification dataset over a `root/<class_name>/<image>` folder tree (ImageNet / CIFAR layout)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from detres.data.image_io import read_image_rgb

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
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


class ImageFolderDataset(Dataset):
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
        self.extensions = _normalise_extensions(extensions)
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
        bad = {n: l for n, l in mapping.items() if l < 0}
        if bad:
            raise ValueError(f"class_to_idx: labels must be >= 0, got {bad}")
        if len(set(mapping.values())) != len(mapping):
            raise ValueError(f"class_to_idx: two classes share a label in {mapping}")
        return mapping

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
