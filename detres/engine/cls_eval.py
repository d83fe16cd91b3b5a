"""Evaluate a classification checkpoint of any format (train_cls, legacy CIFAR .th, torchvision) on an
ImageFolder, or on a flat image folder with a labels file (ImageNet / Tiny-ImageNet val).

The checkpoint format is detected from its contents (``detect_checkpoint_format``):

* ``detres`` (``tools/train_cls.py``'s ``last.pt`` / ``model_final.pt``): the network comes from the
  stored ``model_args``, the class order from ``class_names``, the normalisation (per-pixel mean image
  for crops, channel mean for dense multi-scale, optional std) from ``data_stats`` and the default
  test geometry from the stored config;
* ``cifar_legacy`` (``{'state_dict': ..., 'best_prec1': ...}`` with ``module.`` keys) and plain
  ``state_dict`` files (torchvision ResNets): the network is given by ``arch``/``depth`` or inferred
  from the keys, classes are the sorted class folders (torchvision's CIFAR-10 and ImageNet orders),
  and the normalisation defaults to torchvision's ImageNet mean/std on RGB, which those were trained with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Subset

from detres.data.cls_pipeline import ClsDataStats
from detres.data.datasets.imagefolder import ImageFolderDataset, ImageListDataset
from detres.data.transforms.classification import (
    PAPER_TEST_SCALES,
    Normalize,
    eval_transform_for_mode,
)
from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from detres.data.worker_errors import readable_worker_errors
from detres.evaluation.classification import MODES, evaluate_classifier
from detres.models.backbones.resnet import IMAGENET_DEPTHS
from detres.models.backbones.weights import checkpoint_state_dict, load_state_dict_strict
from detres.models.build import build_classifier
from detres.utils.torch_files import load_checkpoint

NORMALIZE_CHOICES = ("auto", "checkpoint", "imagenet", "none")
# Dense multi-scale shorter sides for 32x32 CIFAR images when nothing else is known (1x, 1.25x, 1.5x).
CIFAR_TEST_SCALES: tuple[int, ...] = (32, 40, 48)


@dataclass
class LoadedClassifier:
    """A classifier rebuilt from a checkpoint file, with what the file says about its training."""

    model: nn.Module
    format: str  # "detres", "cifar_legacy" or "state_dict"
    model_args: dict[str, Any]
    class_names: list[str] | None = None
    data_stats: ClsDataStats | None = None
    config: dict[str, Any] | None = None
    bn_recomputed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _block_indices(state_dict: Mapping[str, Tensor], layer: str) -> list[int]:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{layer}\.(\d+)\.", k))}
    return sorted(found)


def infer_resnet_layout(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """``{arch, depth, shortcut}`` of a ResNet state_dict from its key names.

    ImageNet nets have ``layer4``; CIFAR nets stop at ``layer3``. Bottleneck blocks have ``conv3``.
    Shortcut: projections (``downsample``) in every block = C, in some = B, in none = A.
    """
    if "fc.weight" not in state_dict:
        raise ValueError("the state_dict has no 'fc.weight': not a ResNet classifier")
    stages = ["layer1", "layer2", "layer3", "layer4"]
    blocks = {name: _block_indices(state_dict, name) for name in stages}
    with_proj = sum(1 for k in state_dict if re.match(r"layer\d\.\d+\.downsample\.0\.weight$", k))
    num_blocks = sum(len(b) for b in blocks.values())
    shortcut = "C" if num_blocks and with_proj == num_blocks else ("B" if with_proj else "A")
    if blocks["layer4"]:
        counts = tuple(len(blocks[s]) for s in stages)
        kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state_dict) else "basic"
        for depth, layout in IMAGENET_DEPTHS.items():
            if layout == (kind, counts):
                return {"arch": "imagenet", "depth": depth, "shortcut": shortcut}
        raise ValueError(f"the state_dict has {kind} blocks {counts} per stage, which is no depth of Table 1")
    counts = tuple(len(blocks[s]) for s in stages[:3])
    if not counts[0] or len(set(counts)) != 1:
        raise ValueError(f"the state_dict has {counts} blocks in layer1..layer3; a CIFAR ResNet has n in each")
    return {"arch": "cifar", "depth": 6 * counts[0] + 2, "shortcut": shortcut}


def _external_model_args(
    state_dict: Mapping[str, Tensor], arch: str | None, depth: int | None, source: str
) -> dict[str, Any]:
    try:
        inferred = infer_resnet_layout(state_dict)
    except ValueError as exc:
        if arch is None or depth is None:
            raise ValueError(f"{source}: {exc}; pass arch and depth explicitly") from None
        inferred = {"arch": arch, "depth": depth, "shortcut": "A" if arch == "cifar" else "B"}
    args: dict[str, Any] = {
        "arch": arch or inferred["arch"],
        "depth": int(depth) if depth is not None else inferred["depth"],
        "num_classes": int(state_dict["fc.weight"].shape[0]) if "fc.weight" in state_dict else 1000,
        # Keep the file's own shortcut layout when the user names the same family; otherwise the
        # family's usual one (A for CIFAR as in Sec. 4.2, B for torchvision's ImageNet nets).
        "shortcut": inferred["shortcut"]
        if (arch or inferred["arch"]) == inferred["arch"]
        else ("A" if arch == "cifar" else "B"),
    }
    return args


def load_classifier(path: str | Path, *, arch: str | None = None, depth: int | None = None) -> LoadedClassifier:
    """Rebuild the classifier stored in ``path`` (any of the three formats) on the CPU, in eval mode.

    For our own checkpoints ``arch``/``depth`` may be left out and must agree with the stored
    ``model_args`` when given. For external files they are inferred from the key names when left out;
    given explicitly, a network that does not match the file raises StateDictMismatchError listing
    the missing, unexpected and mis-shaped keys.
    """
    source = str(path)
    state = load_checkpoint(path)
    fmt, state_dict = checkpoint_state_dict(state, source)
    if arch is not None and arch not in ("imagenet", "cifar"):
        raise ValueError(f"arch must be 'imagenet' or 'cifar', got {arch!r}")
    if fmt == "detres":
        model_args = dict(state.get("model_args") or {})
        if "arch" not in model_args or "depth" not in model_args:
            raise ValueError(f"{source}: has no classifier 'model_args' (arch, depth); is it a detection checkpoint?")
        for name, given in (("arch", arch), ("depth", depth)):
            if given is not None and given != model_args[name]:
                raise ValueError(
                    f"{source}: {name}={given!r} was given but the checkpoint holds "
                    f"{name}={model_args[name]!r} (model_args {model_args})"
                )
    else:
        model_args = _external_model_args(state_dict, arch, depth, source)
    model = build_classifier(**model_args)
    load_state_dict_strict(
        model,
        state_dict,
        source=f"{source} ({fmt} checkpoint, built as {model_args['arch']} ResNet-{model_args['depth']})",
    )
    model.eval()
    loaded = LoadedClassifier(model=model, format=fmt, model_args=model_args)
    if fmt == "detres":
        loaded.class_names = list(state["class_names"]) if state.get("class_names") else None
        loaded.data_stats = ClsDataStats.from_dict(state["data_stats"]) if state.get("data_stats") else None
        loaded.config = state.get("config")
        loaded.bn_recomputed = state.get("bn_recomputed")
        loaded.extra["iter"] = state.get("iter")
    elif fmt == "cifar_legacy" and "best_prec1" in state:
        loaded.extra["best_prec1"] = float(state["best_prec1"])
    return loaded


def default_geometry(loaded: LoadedClassifier) -> dict[str, Any]:
    """Test geometry the checkpoint was made for: {resize, crop, scales, train_crop} (resize None = keep
    the size). ``train_crop`` is the training crop size, whose feature-map window the dense test scores."""
    cfg = loaded.config
    if cfg is not None:
        cifar_mode = cfg["augment"]["mode"] == "cifar"
        crop = cfg["augment"]["crop"]
        return {
            "resize": None if cifar_mode else cfg["test"]["resize"],
            "crop": crop,
            "scales": list(cfg["test"]["scales"]),
            "train_crop": crop,
        }
    if loaded.model_args["arch"] == "cifar":
        return {"resize": None, "crop": 32, "scales": list(CIFAR_TEST_SCALES), "train_crop": 32}
    return {"resize": 256, "crop": 224, "scales": list(PAPER_TEST_SCALES), "train_crop": 224}


def build_normalize(loaded: LoadedClassifier, kind: str, *, dense: bool) -> Normalize:
    """Normalisation for a test mode: the checkpoint's own statistics, ImageNet mean/std, or none."""
    if kind not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {kind!r}")
    if kind == "auto":
        kind = "checkpoint" if loaded.data_stats is not None else "imagenet"
    if kind == "checkpoint":
        if loaded.data_stats is None:
            raise ValueError(
                f"a {loaded.format} checkpoint stores no data statistics; "
                "use normalize='imagenet' (torchvision / legacy CIFAR weights) or 'none'"
            )
        return loaded.data_stats.normalize(dense=dense)
    if kind == "imagenet":
        return Normalize(mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB)
    return Normalize(mean=(0.0, 0.0, 0.0))


def _eval_dataset(
    loaded: LoadedClassifier, data_dir: str | Path, val_labels: str | Path | None = None
) -> ImageFolderDataset | ImageListDataset:
    num_outputs = loaded.model_args["num_classes"]
    if loaded.class_names is not None:
        class_to_idx = {name: i for i, name in enumerate(loaded.class_names)}
        if val_labels is not None:
            return ImageListDataset(data_dir, val_labels, class_to_idx=class_to_idx)
        return ImageFolderDataset(data_dir, class_to_idx=class_to_idx)
    if val_labels is not None:
        dataset = ImageListDataset(data_dir, val_labels)
        what = f"{val_labels}: {len(dataset.class_names)} classes"
    else:
        dataset = ImageFolderDataset(data_dir)
        what = f"{data_dir}: {len(dataset.class_names)} class folders"
    if len(dataset.class_names) != num_outputs:
        raise ValueError(
            f"{what}, but the checkpoint's classifier has {num_outputs} outputs; labels are the sorted "
            f"class names, so the counts must match"
        )
    return dataset


def _first_per_class(dataset: ImageFolderDataset, max_per_class: int) -> list[int]:
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(dataset.targets):
        if taken.get(label, 0) < max_per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return keep


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    *,
    arch: str | None = None,
    depth: int | None = None,
    normalize: str = "auto",
    modes: Sequence[str] = ("1crop",),
    resize: int | None | str = "auto",
    crop: int | None | str = "auto",
    scales: Sequence[int] | None = None,
    batch_size: int = 100,
    num_workers: int = 0,
    device: str = "cpu",
    max_per_class: int | None = None,
    val_labels: str | Path | None = None,
    train_crop: int | str = "auto",
) -> dict[str, Any]:
    """Top-1/top-5 accuracy and error of ``checkpoint`` on ``data_dir`` for each test mode.

    ``data_dir`` is an ImageFolder, or with ``val_labels`` a flat image folder whose labels file lists
    ``<file> <class name> ...`` per line (images of classes the model lacks are skipped and counted
    in ``val_skipped_unknown_class``). ``resize``/``crop``/``scales``/``train_crop`` default
    ("auto"/None) to the geometry the checkpoint was trained for (see :func:`default_geometry`);
    ``train_crop`` sets the window of the dense multi-scale test. ``max_per_class`` evaluates the
    first N images of each class.
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes: expected some of {MODES}, got {list(modes)}")
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"evaluation folder not found: {data_dir}")
    loaded = load_classifier(checkpoint, arch=arch, depth=depth)
    geometry = default_geometry(loaded)
    if resize != "auto":
        geometry["resize"] = resize
    if crop != "auto":
        geometry["crop"] = crop
    if scales is not None:
        geometry["scales"] = [int(s) for s in scales]
    if train_crop != "auto":
        geometry["train_crop"] = int(train_crop)
    dataset = _eval_dataset(loaded, data_dir, val_labels)
    data = dataset if max_per_class is None else Subset(dataset, _first_per_class(dataset, int(max_per_class)))
    results: dict[str, Any] = {}
    for mode in modes:
        norm = build_normalize(loaded, normalize, dense=mode == "multiscale")
        if mode == "multiscale":
            dataset.transform = eval_transform_for_mode(mode, normalize=norm, scales=tuple(geometry["scales"]))
        else:
            dataset.transform = eval_transform_for_mode(
                mode, normalize=norm, resize=geometry["resize"], crop=geometry["crop"]
            )
        with readable_worker_errors():
            errors = evaluate_classifier(
                loaded.model,
                data,
                mode=mode,
                scales=tuple(geometry["scales"]),
                device=device,
                batch_size=batch_size,
                num_workers=num_workers,
                crop=geometry["train_crop"],
            )
        results[mode] = {**errors, "top1_acc": 1.0 - errors["top1_err"], "top5_acc": 1.0 - errors["top5_err"]}
    skipped = {}
    if val_labels is not None:
        skipped = {"val_labels": str(val_labels), "val_skipped_unknown_class": dataset.num_skipped}
    return {
        "checkpoint": str(checkpoint),
        "format": loaded.format,
        "model_args": loaded.model_args,
        "data": str(data_dir),
        "num_images": len(data),
        **skipped,
        "normalize": normalize
        if normalize != "auto"
        else ("checkpoint" if loaded.data_stats is not None else "imagenet"),
        "geometry": geometry,
        "bn_recomputed": loaded.bn_recomputed,
        "results": results,
        **loaded.extra,
    }
