"""Tests for detres.data.datasets.ilsvrc: synset list, image set, blacklist and LOC XML folder readers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from detres.data.datasets.ilsvrc import (
    read_blacklist,
    read_image_set,
    read_loc_xml_folder,
    read_synsets,
    synset_labels,
)
from detres.data.datasets.voc_xml import VOCAnnotationError

DATA_TOY_LOC = Path(__file__).resolve().parents[3] / "data_toy" / "loc"


@pytest.fixture(scope="module")
def generated_loc(tmp_path_factory) -> Path:
    """A fresh 12-image ILSVRC-style validation set written by the shapes-world generator (as data_toy/loc is)."""
    from detres.data.shapes.world import generate_shapes_world

    root = tmp_path_factory.mktemp("loc_world")
    generate_shapes_world(
        root,
        num_cls_train_per_class=0,
        num_cls_val_per_class=0,
        num_det_train=0,
        num_det_val=0,
        num_loc_train=0,
        num_loc_val=12,
    )
    return root / "loc"


def _loc_roots(generated_loc: Path) -> list[Path]:
    return [generated_loc] + ([DATA_TOY_LOC] if (DATA_TOY_LOC / "Annotations" / "val").is_dir() else [])


def _solution_csv(path: Path, synsets: list[str]) -> dict[str, list[tuple[int, tuple[int, ...]]]]:
    """The generator's Kaggle-style ``LOC_val_solution.csv``: an independent record of the written boxes."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ImageId", "PredictionString"]
    out = {}
    for image_id, text in rows[1:]:
        fields = text.split()
        groups = [fields[j : j + 5] for j in range(0, len(fields), 5)]
        out[image_id] = [(synsets.index(g[0]) + 1, tuple(int(v) for v in g[1:])) for g in groups]
    return out


def test_xml_folder_matches_the_solution_csv(generated_loc: Path):
    # data_toy/loc (tools/make_toy_data.py, not in git) is checked too when it exists; the generated set always.
    for loc in _loc_roots(generated_loc):
        synsets = read_synsets(loc / "LOC_synset_mapping.txt")
        assert len(synsets) == 10 and synsets[0] == "n90000001"
        image_ids = sorted(p.stem for p in (loc / "Annotations" / "val").glob("*.xml"))
        from_xml = read_loc_xml_folder(loc / "Annotations" / "val", image_ids, synsets)
        from_csv = _solution_csv(loc / "LOC_val_solution.csv", synsets)
        assert from_xml == from_csv and list(from_xml) == image_ids
        assert any(len(objects) > 1 for objects in from_xml.values())  # some images hold several boxes
        for objects in from_xml.values():
            assert all(1 <= label <= 10 and box[0] >= 1 and box[1] >= 1 for label, box in objects)


XML = """<annotation><filename>{stem}.JPEG</filename><size><width>500</width><height>375</height></size>
{objects}</annotation>"""
OBJECT = (
    "<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
    "<ymax>{b[3]}</ymax></bndbox></object>"
)


def write_xml(folder: Path, stem: str, objects: list[tuple[str, tuple]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.xml"
    path.write_text(XML.format(stem=stem, objects="".join(OBJECT.format(name=n, b=b) for n, b in objects)))
    return path


def test_hand_written_xml(tmp_path: Path):
    synsets = ["n01440764", "n01443537", "n01484850"]
    write_xml(
        tmp_path / "ann",
        "ILSVRC2012_val_00000001",
        [("n01484850", (12, 20, 300, 200)), ("n01484850", (1, 1, 500, 375))],
    )
    write_xml(tmp_path / "ann", "ILSVRC2012_val_00000002", [("n01440764", (5, 6, 5, 6))])  # one-pixel box
    gt = read_loc_xml_folder(tmp_path / "ann", ["ILSVRC2012_val_00000002", "ILSVRC2012_val_00000001"], synsets)
    assert list(gt) == ["ILSVRC2012_val_00000002", "ILSVRC2012_val_00000001"]  # image-set order
    assert gt["ILSVRC2012_val_00000001"] == [(3, (12, 20, 300, 200)), (3, (1, 1, 500, 375))]
    assert gt["ILSVRC2012_val_00000002"] == [(1, (5, 6, 5, 6))]


def test_xml_folder_errors_name_the_file(tmp_path: Path):
    synsets = ["n01440764"]
    bad = write_xml(tmp_path / "ann", "unknown", [("n09999999", (1, 1, 5, 5))])
    with pytest.raises(ValueError, match=r"unknown\.xml: object #0: wnid 'n09999999' is not in the synset list"):
        read_loc_xml_folder(tmp_path / "ann", ["unknown"], synsets)
    empty = write_xml(tmp_path / "ann", "empty", [])
    with pytest.raises(ValueError, match=f"{empty}: no <object>"):
        read_loc_xml_folder(tmp_path / "ann", ["empty"], synsets)
    bad.write_text("<annotation><object>")
    with pytest.raises(VOCAnnotationError, match="not well-formed XML"):
        read_loc_xml_folder(tmp_path / "ann", ["unknown"], synsets)
    with pytest.raises(FileNotFoundError, match="annotation of image 'absent' not found"):
        read_loc_xml_folder(tmp_path / "ann", ["absent"], synsets)
    with pytest.raises(FileNotFoundError, match="annotations folder not found"):
        read_loc_xml_folder(tmp_path / "nope", ["absent"], synsets)


def test_synsets_image_set_and_their_errors(tmp_path: Path):
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n\n")
    plain = tmp_path / "wnids.txt"
    plain.write_text("n01440764\nn01443537")
    assert read_synsets(mapping) == read_synsets(plain) == ["n01440764", "n01443537"]
    assert synset_labels(read_synsets(mapping)) == {"n01440764": 1, "n01443537": 2}
    plain.write_text("n01440764\nn01443537\nn01440764\n")
    with pytest.raises(ValueError, match=r"wnids\.txt:3: 'n01440764' is listed twice \(first on line 1\)"):
        read_synsets(plain)
    image_set = tmp_path / "val.txt"
    image_set.write_text("ILSVRC2012_val_00000001 1\nILSVRC2012_val_00000002 2\n")
    assert read_image_set(image_set) == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002"]
    image_set.write_text("\n")
    with pytest.raises(ValueError, match="image set is empty"):
        read_image_set(image_set)


def test_blacklist_by_id_or_devkit_index(tmp_path: Path):
    ids = ["img_a", "img_b", "img_c"]
    path = tmp_path / "blacklist.txt"
    path.write_text("img_c\n1\n3\n")  # an id, then the devkit's 1-based indices (3 repeats img_c)
    assert read_blacklist(path, ids) == ["img_c", "img_a"]
    path.write_text("2\n4\n")
    with pytest.raises(ValueError, match=r"blacklist\.txt:2: '4' is neither an image id .* nor an index in 1\.\.3"):
        read_blacklist(path, ids)
