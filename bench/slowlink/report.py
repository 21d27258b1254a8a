"""`slowlink` outcomes + byte samples -> per-contender figures (JSON) and the table.

Bytes: both directions of every worker link together, counted at the bridge ends from the
start of training (`Outcome.t0`) on; a point's bytes are the counters interpolated at its
time. The curves run on a training clock: seconds and bytes since t0 without the pauses
(evals, epoch ends; `Outcome.pauses`), so that evaluating, which the contenders do
differently, does not count as training; wall time and all bytes are reported as well.
Target: the eval loss SYNC ends with; a contender reaches it where its eval curve (linear
between eval points, on the training clock) first comes within `TARGET_TOL` of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from bench.slowlink.contenders import SYNC, Contender
from bench.slowlink.job import SlowJob
from bench.slowlink.outcome import Outcome, Point
from bench.slowlink.topology import ByteSampler, Shaping

TARGET_TOL = 0.01
"""Nats above the target that count as reaching it (DDP and SYNC run the same math: their
curves differ by float noise, which must not read as "never reached")."""
PEAK_WINDOW_S = 1.0
"""Throughput on a link is checked over windows at least this long."""
RATE_SLACK = 1.05
"""A window may carry up to this x rate x window + burst (sampling jitter, headers)."""


def _interp(times: Sequence[float], values: Sequence[float], t: float) -> float:
    return float(np.interp(t, times, values))


def peak_bytes_per_s(times: Sequence[float], counts: Sequence[int], window_s: float) -> float:
    """The largest mean rate over any span between two samples at least `window_s` apart."""
    best, j = 0.0, 0
    for i in range(len(times)):
        j = max(j, i + 1)
        while j < len(times) and times[j] - times[i] < window_s:
            j += 1
        if j == len(times):
            break
        best = max(best, (counts[j] - counts[i]) / (times[j] - times[i]))
    return best


def crossing(points: Sequence[Mapping[str, float]], level: float) -> dict[str, float] | None:
    """Where a curve of {s, tokens, bytes, loss} first gets to `level` (linear between
    points); None if it never does."""
    for i, p in enumerate(points):
        if p["loss"] <= level:
            if i == 0:
                return {k: p[k] for k in ("s", "tokens", "bytes")}
            q = points[i - 1]
            f = (q["loss"] - level) / (q["loss"] - p["loss"])
            return {k: q[k] + f * (p[k] - q[k]) for k in ("s", "tokens", "bytes")}
    return None


def _overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: json_format.MessageToDict(v) if isinstance(v, Message) else v
        for k, v in overrides.items()
    }


def overrides_text(overrides: Mapping[str, Any]) -> str:
    parts = []
    for k, v in overrides.items():
        shown = text_format.MessageToString(v, as_one_line=True) if isinstance(v, Message) else v
        parts.append(f"{k}={{{shown}}}" if isinstance(v, Message) else f"{k}={shown}")
    return ", ".join(parts)


class Clock:
    """Training seconds and training bytes at a moment: since `t0`, the pauses left out."""

    def __init__(self, out: Outcome) -> None:
        self.out = out

    def seconds(self, t: float) -> float:
        paused = sum(max(0.0, min(t, b) - a) for a, b in self.out.pauses)
        return t - self.out.t0 - paused

    def bytes(self, times: Sequence[float], counts: Sequence[int], t: float) -> float:
        """Bytes a counter series grew by from t0 to `t`, less what it grew in the pauses."""

        def at(x: float) -> float:
            return _interp(times, counts, x)

        paused = sum(at(min(t, b)) - at(a) for a, b in self.out.pauses if a < t)
        return at(t) - at(self.out.t0) - paused


def summarize_one(
    c: Contender, out: Outcome, sampler: ByteSampler, shaping: Shaping
) -> dict[str, Any]:
    clock = Clock(out)
    times, totals = sampler.worker_total()
    moved = {"up": 0.0, "down": 0.0}
    training = {"up": 0.0, "down": 0.0}
    peak = 0.0
    for link in sampler.topo.workers:
        for direction in moved:
            t, b = sampler.series(link.netns, direction)
            moved[direction] += _interp(t, b, out.t1) - _interp(t, b, out.t0)
            training[direction] += clock.bytes(t, b, out.t1)
            peak = max(peak, peak_bytes_per_s(t, b, PEAK_WINDOW_S))
    limit = RATE_SLACK * shaping.bytes_per_s + shaping.burst / PEAK_WINDOW_S
    checks = {
        **out.checks,
        "finite": all(math.isfinite(p.loss) for p in out.train + out.evals),
        "eval_loss_fell": out.evals[-1].loss < out.evals[0].loss,
        "within_link_rate": peak <= limit,
    }

    def curve(points: list[Point]) -> list[dict[str, float]]:
        return [
            {
                "s": clock.seconds(p.t),
                "wall_s": p.t - out.t0,
                "tokens": p.tokens,
                "bytes": clock.bytes(times, totals, p.t),
                "loss": p.loss,
            }
            for p in points
        ]

    train_total = training["up"] + training["down"]
    return {
        "label": c.label,
        "launcher": c.launcher,
        "overrides": _overrides(c.overrides),
        "wall_s": out.wall_s,
        "train_s": clock.seconds(out.t1),
        "tokens": out.tokens,
        "first_eval_loss": out.evals[0].loss,
        "final_eval_loss": out.evals[-1].loss,
        # Both directions of every worker link: from t0 to t1, and without the pauses.
        "link_bytes": {**moved, "total": moved["up"] + moved["down"]},
        "link_bytes_training": {**training, "total": train_total},
        "link_bytes_per_token": train_total / out.tokens,
        "sent_bytes_per_token": training["up"] / out.tokens,
        "peak_link_bytes_per_s": peak,
        "checks": checks,
        "ok": all(checks.values()),
        "train": curve(out.train),
        "evals": curve(out.evals),
        "pauses_s": [[a - out.t0, b - out.t0] for a, b in out.pauses],
        "extra": out.extra,
    }


def summarize(
    job: SlowJob,
    contenders: list[Contender],
    runs: Mapping[str, tuple[Outcome, ByteSampler]],
    shaping: Shaping,
) -> dict[str, Any]:
    rows = {
        c.key: summarize_one(c, *runs[c.key], shaping=shaping) for c in contenders if c.key in runs
    }
    target = rows[SYNC]["final_eval_loss"] if SYNC in rows else math.nan
    for r in rows.values():
        r["to_target"] = crossing(r["evals"], target + TARGET_TOL)
    return {
        "job": job.__dict__,
        "rate_mbit": shaping.rate_mbit,
        "tokens_budget": job.tokens,
        "target_eval_loss": target,
        "target_tolerance": TARGET_TOL,
        "contenders": rows,
    }


def print_table(
    console: Console,
    s: dict[str, Any],
    contenders: list[Contender],
    shaping: Shaping,
    model_bytes: int,
) -> None:
    job = s["job"]
    table = Table(
        title=f"slowlink: {job['preset']} ({model_bytes / 1e6:.0f} MB fp32), each worker link "
        f"{shaping.rate_mbit:g} Mbit/s each way, global batch {job['global_batch']}, "
        f"{job['epochs']} epochs x {job['steps_per_epoch']} steps = {s['tokens_budget']:,} "
        f"tokens; target eval loss {s['target_eval_loss']:.3f} (SYNC's final, +{TARGET_TOL:g})"
    )
    for col in (
        "contender",
        "wall s",
        "train s",
        "eval loss",
        "link MB",
        "sent B/token",
        "peak MB/s",
        "to target: train s, tokens, link MB",
        "check",
    ):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for key, r in s["contenders"].items():
        reach = r["to_target"]
        failed = [k for k, v in r["checks"].items() if not v]
        table.add_row(
            key,
            f"{r['wall_s']:.0f}",
            f"{r['train_s']:.0f}",
            f"{r['final_eval_loss']:.3f}",
            f"{r['link_bytes_training']['total'] / 1e6:,.0f}",
            f"{r['sent_bytes_per_token']:,.0f}",
            f"{r['peak_link_bytes_per_s'] / 1e6:.1f}",
            "not reached"
            if reach is None
            else f"{reach['s']:.0f}, {reach['tokens']:,.0f}, {reach['bytes'] / 1e6:,.0f}",
            "[red]FAILED " + ", ".join(failed) + "[/]" if failed else "ok",
        )
    legend = "; ".join(
        f"{c.key} = {c.label}" + (f" ({overrides_text(c.overrides)})" if c.overrides else "")
        for c in contenders
        if c.key in s["contenders"]
    )
    table.caption = (
        f"{legend}. Every contender trains {s['tokens_budget']:,} tokens. wall: first step to "
        "last eval; train s, link MB (both directions of all worker links) and sent B/token "
        "(the workers' side only): the same without the evals and epoch ends; peak: busiest "
        f"direction of any link over {PEAK_WINDOW_S:g} s (the rate is "
        f"{shaping.bytes_per_s / 1e6:.1f} MB/s); to target: where the eval curve (linear "
        "between the evals after each epoch, on the training clock) first gets there"
    )
    console.print(table)
