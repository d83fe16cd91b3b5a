"""Tests for detres.data.datasets.pennfudan and tools/convert_pennfudan.py: counts, 1-based box conversion, atomic
write."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from detres.data.datasets.coco import CocoDetection
from detres.data.datasets.pennfudan import convert_pennfudan, parse_pennfudan_annotation, pennfudan_to_coco

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def pennfudan(shared_dir: Path) -> Path:
    root = shared_dir / "data" / "pennfudan" / "PennFudanPed"
    if not (root / "Annotation").is_dir():
        pytest.skip(f"PennFudanPed not found at {root}")
    return root


def _load_cli():
    spec = importlib.util.spec_from_file_location("convert_pennfudan_cli", REPO_ROOT / "tools" / "convert_pennfudan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_conversion_counts_and_boxes(pennfudan: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "pennfudan.json"
    counts = convert_pennfudan(pennfudan, out)
    assert counts == {"images": 170, "boxes": 423}
    doc = json.loads(out.read_text())
    # Independent count: one "Bounding box" line per object in the text files.
    texts = [f.read_text(encoding="latin-1") for f in (pennfudan / "Annotation").glob("*.txt")]
    n_lines = sum(t.count("\nBounding box") for t in texts)
    assert len(doc["images"]) == 170 and len(doc["annotations"]) == n_lines == 423
    assert doc["categories"] == [{"id": 1, "name": "person", "supercategory": "person"}]
    assert len({im["id"] for im in doc["images"]}) == 170 and len({a["id"] for a in doc["annotations"]}) == 423
    by_name = {im["file_name"]: im for im in doc["images"]}
    first = by_name["FudanPed00001.png"]
    assert (first["width"], first["height"]) == (559, 536)
    boxes = [a["bbox"] for a in doc["annotations"] if a["image_id"] == first["id"]]
    # File: (160, 182) - (302, 431) and (420, 171) - (535, 486), 1-based inclusive.
    assert boxes == [[159, 181, 143, 250], [419, 170, 116, 316]]
    # Every image's size and boxes against a regex reading of its text file: the 1-based inclusive
    # (Xmin, Ymin) - (Xmax, Ymax) becomes COCO [Xmin - 1, Ymin - 1, Xmax - Xmin + 1, Ymax - Ymin + 1].
    by_id = {im["id"]: im for im in doc["images"]}
    got = {by_id[a["image_id"]]["file_name"]: [] for a in doc["annotations"]}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["area"] == w * h and a["iscrowd"] == 0 and a["category_id"] == 1
        got[by_id[a["image_id"]]["file_name"]].append(a["bbox"])
    expected = {}
    for text in texts:
        name = Path(re.search(r'Image filename : "([^"]+)"', text).group(1)).name
        width, height = map(int, re.search(r"Image size \(X x Y x C\) : (\d+) x (\d+)", text).groups())
        assert (by_name[name]["width"], by_name[name]["height"]) == (width, height), name
        expected[name] = [
            [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]
            for x1, y1, x2, y2 in (
                map(int, m) for m in re.findall(r"Bounding box.*: \((\d+), (\d+)\) - \((\d+), (\d+)\)", text)
            )
        ]
    assert got == expected
    assert not [p for p in out.parent.iterdir() if p.name != "pennfudan.json"]  # no temp file left behind

    # The result is a COCO file pycocotools and our loader both read.
    coco = COCO(str(out))
    assert len(coco.getAnnIds()) == 423
    ds = CocoDetection(pennfudan / "PNGImages", out)
    assert len(ds) == 170 and ds.num_boxes == 423 and ds.categories == [{"id": 1, "name": "person"}]
    sample = ds[0]
    assert tuple(sample["image"].shape[1:]) == ds.image_hw(0) == (536, 559)
    assert sample["boxes"].tolist()[0] == [159.0, 181.0, 302.0, 431.0]


def test_both_pedestrian_labels_become_person(pennfudan: Path) -> None:
    labels = set()
    for f in (pennfudan / "Annotation").glob("PennPed0000*.txt"):
        labels.update(o["label"] for o in parse_pennfudan_annotation(f)["objects"])
    assert labels == {"PASpersonWalking", "PASpersonStanding"}
    doc = pennfudan_to_coco(pennfudan)
    assert {a["category_id"] for a in doc["annotations"]} == {1}


_GOOD = """# Compatible with PASCAL Annotation Version 1.00
Image filename : "PennFudanPed/PNGImages/X.png"
Image size (X x Y x C) : 50 x 40 x 3
Objects with ground truth : 1 { "PASpersonWalking" }
Bounding box for object 1 "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : (1, 2) - (50, 40)
"""


def test_parser_reads_fields(tmp_path: Path) -> None:
    path = tmp_path / "X.txt"
    path.write_text(_GOOD)
    rec = parse_pennfudan_annotation(path)
    assert rec == {
        "filename": "X.png",
        "width": 50,
        "height": 40,
        "objects": [{"label": "PASpersonWalking", "bbox": (1, 2, 50, 40)}],
    }


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("(1, 2) - (50, 40)", "(1, 2) - (51, 40)"), r"X\.txt:5: box .* outside the 50x40 image"),
        (lambda t: t.replace("(1, 2) - (50, 40)", "(9, 2) - (5, 40)"), r"X\.txt:5: box .* empty"),
        (lambda t: t.replace("(1, 2) - (50, 40)", "(1; 2) - (50, 40)"), r"X\.txt:5: cannot parse bounding box"),
        (lambda t: t.replace("ground truth : 1", "ground truth : 2"), r"X\.txt: declares 2 objects but has 1"),
        (lambda t: re.sub(r"Image size.*\n", "", t), r"X\.txt: no 'Image size' line"),
    ],
)
def test_parser_errors_name_file_and_line(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "X.txt"
    path.write_text(edit(_GOOD))
    with pytest.raises(ValueError, match=message):
        parse_pennfudan_annotation(path)


def test_failed_conversion_leaves_existing_output_untouched(tmp_path: Path) -> None:
    root = tmp_path / "PennFudanPed"
    (root / "Annotation").mkdir(parents=True)
    (root / "PNGImages").mkdir()
    (root / "Annotation" / "X.txt").write_text(_GOOD)  # X.png is missing
    out = tmp_path / "out.json"
    out.write_text('{"old": true}')
    with pytest.raises(FileNotFoundError, match=r"X\.png"):
        convert_pennfudan(root, out)
    assert json.loads(out.read_text()) == {"old": True}


def test_cli(pennfudan: Path, tmp_path: Path, capsys) -> None:
    cli = _load_cli()
    out = tmp_path / "pf.json"
    assert cli.main(["--root", str(pennfudan), "--out", str(out)]) == 0
    assert "170 images, 423 boxes" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["annotations"]) == 423
    assert cli.main(["--root", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "has no Annotation/ subfolder" in capsys.readouterr().err
