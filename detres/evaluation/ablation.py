"""Table 9 of the ResNet paper (Appendix B ablation): row names, the cost-vs-FLOPs ratio and the markdown table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ROW_NAMES", "ROW_LABELS", "COST_RATIO_LIMIT", "parse_rows", "cost_ratio", "markdown_table", "cost_warnings"]

# Each row adds to the row above it (Table 9: baseline, +box refinement, +context, +multi-scale testing, ensemble).
ROW_NAMES = ("baseline", "refinement", "context", "multiscale", "ensemble")
ROW_LABELS = {
    "baseline": "baseline",
    "refinement": "+box refinement",
    "context": "+context",
    "multiscale": "+multi-scale",
    "ensemble": "ensemble",
}
COST_RATIO_LIMIT = 1.15  # a row may cost at most this much more than its extra FLOPs predict


def parse_rows(text: str | Sequence[str] | None) -> list[str]:
    """Row names from ``"baseline,refinement"`` (or a list), in table order; None = every row."""
    if text is None:
        return list(ROW_NAMES)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown or not names:
        raise ValueError(f"--rows: unknown rows {unknown or names}; choose from {', '.join(ROW_NAMES)}")
    return [n for n in ROW_NAMES if n in names]


def cost_ratio(sec_per_img: float, gflops: float, base_sec: float, base_gflops: float) -> float:
    """(time / baseline time) / (FLOPs / baseline FLOPs): 1 when a row's time grows exactly as its FLOPs."""
    if min(sec_per_img, gflops, base_sec, base_gflops) <= 0:
        return math.nan
    return (sec_per_img / base_sec) / (gflops / base_gflops)


def _pct(value: Any) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _num(value: Any, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One markdown line per row (plus header): mAPs in %, seconds and GFLOPs per image, cost ratio."""
    lines = [
        "| row | mAP@.5 | mAP@[.5:.95] | VOC07 mAP | s/img | GFLOPs/img | cost vs FLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {ROW_LABELS.get(r['row'], r['row'])} | {_pct(r['mAP50'])} | {_pct(r['mAP'])} | "
            f"{_pct(r.get('voc07_mAP'))} | {_num(r['sec_per_img'], 3)} | {_num(r.get('gflops_per_img'), 2)} | "
            f"{_num(r.get('cost_ratio'), 2)} |"
        )
    return "\n".join(lines)


def cost_warnings(rows: Sequence[Mapping[str, Any]], limit: float = COST_RATIO_LIMIT) -> list[str]:
    """A warning line for every row that costs more than ``limit`` times what its FLOPs predict."""
    return [
        f"warning: row {r['row']!r} costs {r['cost_ratio']:.2f}x what its FLOPs predict (limit {limit})"
        for r in rows
        if r.get("cost_ratio") is not None and math.isfinite(r["cost_ratio"]) and r["cost_ratio"] > limit
    ]
