"""detres.evaluation.ablation: Table 9's row names, the cost-vs-FLOPs ratio and the markdown table."""

from __future__ import annotations

import math

import pytest

from detres.evaluation.ablation import ROW_NAMES, cost_ratio, cost_warnings, markdown_table, parse_rows


def test_parse_rows_keeps_table_order_and_names_unknown_rows():
    assert parse_rows(None) == list(ROW_NAMES)
    assert parse_rows("multiscale, baseline") == ["baseline", "multiscale"]
    assert parse_rows(["ensemble", "refinement"]) == ["refinement", "ensemble"]
    with pytest.raises(ValueError, match="flip"):
        parse_rows("baseline,flip")
    with pytest.raises(ValueError):
        parse_rows(",")


def test_cost_ratio_is_time_growth_over_flop_growth():
    assert cost_ratio(0.2, 10.0, 0.1, 5.0) == pytest.approx(1.0)  # twice the FLOPs, twice the time
    assert cost_ratio(0.3, 10.0, 0.1, 5.0) == pytest.approx(1.5)
    assert math.isnan(cost_ratio(0.3, 0.0, 0.1, 5.0))


def _row(name: str, ratio: float) -> dict:
    return {
        "row": name,
        "mAP50": 0.5,
        "mAP": 0.25,
        "voc07_mAP": None,
        "sec_per_img": 0.1234,
        "gflops_per_img": 12.345,
        "cost_ratio": ratio,
    }


def test_markdown_table_has_one_line_per_row_and_warnings_name_costly_rows():
    rows = [_row("baseline", 1.0), _row("refinement", 1.1), _row("multiscale", 1.3)]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].count("|") == lines[3].count("|") == 8
    assert lines[3] == "| +box refinement | 50.0 | 25.0 | - | 0.123 | 12.35 | 1.10 |"
    assert cost_warnings(rows) == [cost_warnings([rows[2]])[0]] and "'multiscale'" in cost_warnings(rows)[0]
