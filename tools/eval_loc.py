"""Score an ILSVRC devkit prediction file: top-1/top-5 and ground-truth-class localization error, classification error.

  tools/eval_loc.py --annotations data_toy/loc/Annotations/val --image-set val_ids.txt \\
      --synsets data_toy/loc/LOC_synset_mapping.txt --predictions pred.txt [--blacklist FILE] [--json-out m.json]

--annotations is a folder of ILSVRC XML files (<image id>.xml; --image-set required), or Tiny-ImageNet's
val_annotations.txt (images in file order unless --image-set is given). Line i of --predictions holds up
to 5 groups "label xmin ymin xmax ymax" for image i (labels 1-based in --synsets order, boxes 1-based
inclusive pixels). Exit status 0 on success, 2 on a usage or input error (the message names file:line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

try:
    import detres  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.data.datasets.ilsvrc import read_blacklist, read_image_set, read_loc_xml_folder, read_synsets
from detres.data.datasets.tiny_imagenet import read_tiny_imagenet_val
from detres.evaluation.localization import evaluate_localization, read_loc_predictions
from detres.utils.atomic import write_json_atomic

ROWS = (
    ("top1_loc_err", "top-1 localization error"),
    ("top5_loc_err", "top-5 localization error"),
    ("gt_known_loc_err", "localization error, ground-truth class"),
    ("top1_cls_err", "top-1 classification error"),
    ("top5_cls_err", "top-5 classification error"),
)


def load_ground_truth(args: argparse.Namespace, synsets: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(image ids in prediction-line order, ground truth) from an XML folder or a Tiny-ImageNet annotations file."""
    annotations = Path(args.annotations)
    if annotations.is_file():
        val = read_tiny_imagenet_val(annotations, synsets)
        return (read_image_set(args.image_set) if args.image_set else val.image_ids), val.ground_truth
    if not args.image_set:
        raise ValueError("--image-set is required when --annotations is a folder of XML files")
    image_ids = read_image_set(args.image_set)
    return image_ids, read_loc_xml_folder(annotations, image_ids, synsets)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    synsets = read_synsets(args.synsets)
    image_ids, ground_truth = load_ground_truth(args, synsets)
    missing = [i for i in image_ids if i not in ground_truth]
    if missing:
        raise ValueError(
            f"{args.annotations}: no ground truth for {len(missing)} image(s) of the image set, first {missing[0]!r}"
        )
    predictions = read_loc_predictions(args.predictions, image_ids, len(synsets))
    blacklist = read_blacklist(args.blacklist, image_ids) if args.blacklist else []
    return evaluate_localization(ground_truth, predictions, image_ids=image_ids, blacklist=blacklist)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--annotations", required=True, help="folder of ILSVRC XML files, or Tiny-ImageNet val_annotations.txt"
    )
    parser.add_argument("--image-set", help="image ids, one per line, in prediction-line order")
    parser.add_argument("--synsets", required=True, help="LOC_synset_mapping.txt or a wnid list (line k = label k)")
    parser.add_argument("--predictions", required=True, help="devkit prediction file, one line per image")
    parser.add_argument("--blacklist", help="images to leave out: image ids or 1-based indices into the image set")
    parser.add_argument("--json-out", help="write the metrics to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = evaluate(args)
        print(
            f"ILSVRC localization (IoU >= {result['iou_thresh']}, up to {result['max_guesses']} guesses): "
            f"{result['num_images']} images, {result['num_blacklisted']} blacklisted"
        )
        for key, name in ROWS:
            print(f"  {name:<40s} {100 * result[key]:6.2f} %")
        if args.json_out:
            write_json_atomic(args.json_out, result)
            print(f"metrics written to {args.json_out}")
    except (OSError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
