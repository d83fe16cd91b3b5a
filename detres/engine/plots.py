"""Training-curve PNGs: error vs iterations (like the ResNet paper's Fig. 4) and loss curves."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from detres.engine.atomic import atomic_write_bytes  # noqa: E402


def plot_curves(
    records: Sequence[dict],
    out_png: str | Path,
    *,
    series: Sequence[tuple[str, str]],
    title: str = "",
    ylabel: str = "",
    percent: bool = False,
) -> None:
    """Plot ``series`` = [(record key, legend label)] against ``iter``; records lacking a key are skipped."""
    import io

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in series:
        points = [(r["iter"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [y * 100 if percent else y for y in ys], label=label, marker="." if len(xs) < 50 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_png, buffer.getvalue())
