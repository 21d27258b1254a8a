"""`slowlink`'s two figures: loss against wall time and against bytes on the worker links."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display here or in CI
import matplotlib.pyplot as plt


def draw(summary: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write `name`-loss-vs-time.png and `name`-loss-vs-bytes.png; return their paths."""
    paths = []
    for axis, xlabel, scale in (
        ("s", "training time: since the first step, evals left out (s)", 1.0),
        ("bytes", "bytes on the worker links while training, both directions (MB)", 1e-6),
    ):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for i, (key, r) in enumerate(summary["contenders"].items()):
            color = f"C{i}"
            train = r["train"]
            ax.plot(
                [p[axis] * scale for p in train],
                [p["loss"] for p in train],
                color=color,
                alpha=0.35,
                linewidth=1,
            )
            ax.plot(
                [p[axis] * scale for p in r["evals"]],
                [p["loss"] for p in r["evals"]],
                color=color,
                marker="o",
                linewidth=2,
                label=f"{key} (eval; thin: train)",
            )
        target = summary["target_eval_loss"]
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target (SYNC's)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats per token)")
        job = summary["job"]
        ax.set_title(
            f"slowlink: {job['preset']}, {summary['rate_mbit']:g} Mbit/s per worker link, "
            f"{summary['tokens_budget']:,} tokens"
        )
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{name}-loss-vs-{'time' if axis == 's' else 'bytes'}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
