"""`peers` samples -> medians, checks, paired ratios (JSON) and the tables."""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import median, spread
from bench.peers.checks import LOSS_TOL, check, max_loss_diff
from bench.peers.contenders import Contender, Sample
from bench.peers.job import PeerJob

REFERENCE = "torch-1"
"""The contender every other one's losses are checked against."""


def ratio_pairs(workers: int, servers: int) -> list[tuple[str, str]]:
    """(numerator, denominator): lmps against each peer doing the same work."""
    lmps = f"lmps-{workers}x{servers}"
    return [(lmps, f"ddp-{workers}"), (lmps, f"rpc-ps-{workers}"), ("lmps-1x1", REFERENCE)]


def wire_bytes(key: str, model_bytes: int, workers: int) -> float:
    """Bytes one gradient-computing process sends + receives per step, by design: a pull of
    the fp32 parameters and a push of the fp32 gradients for a parameter server (lmps, the
    RPC PS), a ring all-reduce's 2 (W-1)/W of the gradients for DDP, nothing alone."""
    if key.startswith(("lmps-", "rpc-ps-")):
        return 2.0 * model_bytes
    if key.startswith("ddp-"):
        return 2.0 * (workers - 1) / workers * model_bytes
    return 0.0


def paired(a: list[Sample], b: list[Sample], attr: str) -> float:
    """Median over repeats of a / b, each pair from the same repeat (the same moment)."""
    return median([getattr(x, attr) / getattr(y, attr) for x, y in zip(a, b, strict=True)])


def summarize(
    job: PeerJob,
    contenders: list[Contender],
    samples: dict[str, list[Sample]],
    *,
    workers: int,
    servers: int,
    model_bytes: int,
) -> dict[str, Any]:
    reference = samples[REFERENCE][0].losses
    rows: dict[str, dict[str, Any]] = {}
    for c in contenders:
        runs = samples[c.key]
        ref = None if c.key == REFERENCE else reference
        checks = [check(s.losses, ref, s.extra) for s in runs]
        tps = [s.tokens_per_s for s in runs]
        tpc = [s.tokens_per_cpu_s for s in runs]
        rows[c.key] = {
            "label": c.label,
            "processes": c.processes,
            "torch_threads": c.threads,
            "tokens_per_s": median(tps),
            "tokens_per_s_spread": spread(tps),
            "tokens_per_cpu_s": median(tpc),
            "tokens_per_cpu_s_spread": spread(tpc),
            "window_cpu_s": median([s.cpu_s for s in runs]),
            "whole_run_wall_s": median([s.whole_wall_s for s in runs]),
            "whole_run_cpu_s": median([s.whole_cpu_s for s in runs]),
            "wire_bytes_per_worker_step": wire_bytes(c.key, model_bytes, c.workers),
            "ok": all(all(ch.values()) for ch in checks),
            "checks": checks,
            "max_loss_diff_vs_torch": max(max_loss_diff(s.losses, reference) for s in runs),
            "samples": [dataclasses.asdict(s) for s in runs],
        }
    ratios = {
        f"{a}/{b}": {
            "tokens_per_s": paired(samples[a], samples[b], "tokens_per_s"),
            "tokens_per_cpu_s": paired(samples[a], samples[b], "tokens_per_cpu_s"),
            "valid": rows[a]["ok"] and rows[b]["ok"],
        }
        for a, b in ratio_pairs(workers, servers)
        if a in samples and b in samples
    }
    return {
        "job": dataclasses.asdict(job),
        "block_size": job.config.block_size,
        "parameters": model_bytes // 4,
        "model_bytes_fp32": model_bytes,
        "contenders": rows,
        "ratios": ratios,
        "lmps_step_breakdown": {
            c.key: _breakdown(samples[c.key]) for c in contenders if c.key.startswith("lmps-")
        },
    }


def _breakdown(runs: list[Sample]) -> dict[str, float]:
    """Median per worker step of the timed window, from the workers' StepEvents."""
    parts = {k: [x for s in runs for x in s.extra[k]] for k in ("pull_s", "compute_s", "push_s")}
    total = sum(sum(v) for v in parts.values())
    out = {f"{k}_median": median(v) for k, v in parts.items()}
    out.update({k.replace("_s", "_fraction"): sum(v) / total for k, v in parts.items()})
    return out


def print_tables(console: Console, s: dict[str, Any]) -> None:
    job = s["job"]
    preset, params = job["preset"], s["parameters"]
    table = Table(
        title=f"peers: {preset} ({params / 1e6:.1f}M params, "
        f"{s['model_bytes_fp32'] / 1e6:.0f} MB fp32), global batch {job['global_batch']} x "
        f"{s['block_size']} tokens, {job['timed_steps']} timed steps after "
        f"{job['warmup_steps']}, median of {len(s['contenders'][REFERENCE]['samples'])}"
    )
    for col in (
        "contender",
        "procs",
        "tokens/s",
        "spread",
        "tokens per CPU-s",
        "spread",
        "run CPU-s",
        "wire MB / worker-step",
        "check",
    ):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for key, r in s["contenders"].items():
        table.add_row(
            key,
            str(r["processes"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s_spread']:.0%}",
            f"{r['tokens_per_cpu_s']:,.0f}",
            f"{r['tokens_per_cpu_s_spread']:.0%}",
            f"{r['whole_run_cpu_s']:.0f}",
            f"{r['wire_bytes_per_worker_step'] / 1e6:.0f}",
            "ok" if r["ok"] else "[red]FAILED[/]",
        )
    legend = "; ".join(
        f"{k} = {r['label']}, torch threads {r['torch_threads']}"
        for k, r in s["contenders"].items()
    )
    table.caption = (
        f"{legend}. "
        "CPU-s: user + system of every process of the contender over the timed window; "
        "run CPU-s: their whole lives (start-up included). check: losses finite, falling and "
        f"within {LOSS_TOL:g} of torch-1's at every step; DDP ranks equal; lmps on the same rows"
    )
    console.print(table)

    ratios = Table(title=f"peers: {preset}, ratios (median over repeats of paired runs)")
    for col in ("ratio", "tokens/s", "tokens per CPU-s", ""):
        ratios.add_column(col, justify="left" if col == "ratio" else "right")
    for name, r in s["ratios"].items():
        ratios.add_row(
            name,
            f"{r['tokens_per_s']:.2f}",
            f"{r['tokens_per_cpu_s']:.2f}",
            "" if r["valid"] else "[red]a contender failed its check[/]",
        )
    console.print(ratios)

    steps = Table(title=f"peers: {preset}, lmps worker step (median, from StepEvents)")
    for col in ("", "pull ms", "fwd+bwd ms", "push ms", "share pull/compute/push"):
        steps.add_column(col, justify="right")
    for key, b in s["lmps_step_breakdown"].items():
        steps.add_row(
            key,
            f"{b['pull_s_median'] * 1e3:.0f}",
            f"{b['compute_s_median'] * 1e3:.0f}",
            f"{b['push_s_median'] * 1e3:.0f}",
            f"{b['pull_fraction']:.0%} / {b['compute_fraction']:.0%} / {b['push_fraction']:.0%}",
        )
    console.print(steps)
