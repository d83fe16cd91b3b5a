"""Convert the Penn-Fudan pedestrian annotations (PASCAL v1.00 text) to a COCO instances JSON."""

from __future__ import annotations

import argparse
import sys

from detres.data.datasets.pennfudan import convert_pennfudan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="the PennFudanPed folder (holds Annotation/ and PNGImages/)")
    parser.add_argument(
        "--out", required=True, help="output JSON path; image file_names in it are relative to ROOT/PNGImages"
    )
    args = parser.parse_args(argv)
    try:
        counts = convert_pennfudan(args.root, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {counts['images']} images, {counts['boxes']} boxes, 1 category (person)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
