"""Tests for detres.data.datasets.tiny_imagenet.read_tiny_imagenet_val on a hand-written file and on ../shared's
copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from detres.data.datasets.ilsvrc import read_synsets
from detres.data.datasets.tiny_imagenet import read_tiny_imagenet_val


def test_hand_written_file_boxes_become_one_based(tmp_path: Path):
    path = tmp_path / "val_annotations.txt"
    path.write_text("val_0.JPEG\tn02\t0\t32\t44\t62\nval_1.JPEG\tn01\t0\t0\t63\t63\nval_0.JPEG\tn02\t5\t5\t5\t5\n")
    val = read_tiny_imagenet_val(path, ["n01", "n02"])
    assert val.image_ids == ["val_0", "val_1"] and val.skipped == {}
    # 0-based inclusive (0, 32, 44, 62) -> 1-based inclusive (1, 33, 45, 63); the whole 64 px image is (1, 1, 64, 64).
    assert val.ground_truth == {"val_0": [(2, (1, 33, 45, 63)), (2, (6, 6, 6, 6))], "val_1": [(1, (1, 1, 64, 64))]}


def test_unknown_wnid_is_an_error_or_skipped_and_counted(tmp_path: Path):
    path = tmp_path / "val_annotations.txt"
    path.write_text("val_0.JPEG\tn02\t0\t32\t44\t62\nval_1.JPEG\tn99\t0\t0\t63\t63\n")
    with pytest.raises(ValueError, match=r"val_annotations\.txt:2: wnid 'n99' is not in the synset list"):
        read_tiny_imagenet_val(path, ["n02"])
    val = read_tiny_imagenet_val(path, ["n02"], unknown="skip")
    assert val.image_ids == ["val_0"] and val.skipped == {"n99": 1}


@pytest.mark.parametrize(
    "line, message",
    [
        ("val_0.JPEG\tn02\t0\t32\t44", "expected '<file> <wnid>"),
        ("val_0.JPEG\tn02\t0\t32\t44\tx", "is not 4 integers"),
        ("val_0.JPEG\tn02\t9\t32\t4\t40", "is not a 0-based inclusive box"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "val_annotations.txt"
    path.write_text(f"val_1.JPEG\tn02\t0\t0\t63\t63\n{line}\n")
    with pytest.raises(ValueError, match=message) as info:
        read_tiny_imagenet_val(path, ["n02"])
    assert f"{path}:2:" in str(info.value)


def test_shared_tiny_imagenet_val(shared_dir: Path):
    root = shared_dir / "data" / "tiny_imagenet_loc" / "tiny-imagenet-200"
    if not (root / "val" / "val_annotations.txt").is_file():
        pytest.skip(f"Tiny-ImageNet not found at {root}")
    synsets = read_synsets(root / "wnids.txt")
    assert len(synsets) == 202
    val = read_tiny_imagenet_val(root / "val" / "val_annotations.txt", synsets)
    assert len(val.image_ids) == 10100 and val.skipped == {}
    assert val.ground_truth["val_0"] == [(synsets.index("n03444034") + 1, (1, 33, 45, 63))]
    boxes = [box for objects in val.ground_truth.values() for _, box in objects]
    assert len(boxes) == 10100 and min(min(b) for b in boxes) == 1 and max(max(b) for b in boxes) == 64
    # The two validation classes without training images are evaluated (50 images each), not dropped.
    without_train = [w for w in synsets if not (root / "train" / w).is_dir()]
    assert sorted(without_train) == ["n02480855", "n10148035"]
    for wnid in without_train:
        label = synsets.index(wnid) + 1
        assert sum(objects[0][0] == label for objects in val.ground_truth.values()) == 50
    # Against the 200 classes that have training images, those 100 images are refused, or skipped and counted.
    trained = [w for w in synsets if w not in without_train]
    with pytest.raises(ValueError, match="is not in the synset list"):
        read_tiny_imagenet_val(root / "val" / "val_annotations.txt", trained)
    val = read_tiny_imagenet_val(root / "val" / "val_annotations.txt", trained, unknown="skip")
    assert len(val.image_ids) == 10000 and val.skipped == {"n02480855": 50, "n10148035": 50}
