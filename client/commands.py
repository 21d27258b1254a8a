"""What each `lmps` command does, given its parsed flags (`lmps.client.cli` builds them):
one `cmd_*` a command, returning the exit code. The local cluster's commands (`cluster`,
`clean`) are in `lmps.client.cluster_cmds`. Each imports what it needs when it runs, so
that `lmps --help` stays quick."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lmps.client.cli_common import console, options_from_args

if TYPE_CHECKING:
    from lmps.client.train_options import TrainOptions


def cmd_serve(args: argparse.Namespace) -> int:
    if args.role == "coordinator":
        from lmps.services.coordinator.main import main
    elif args.role == "ps":
        from lmps.services.parameter_server.main import main
    else:
        from lmps.services.worker.main import main
    return main(args=args)


def cmd_train(args: argparse.Namespace) -> int:
    from lmps.client.train import train

    train(options_from_args(args), console)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmps.client import model_io
    from lmps.client.generation import generate_text, sampling_settings, unescape

    if args.prompt is not None and args.prompt_text is not None:
        raise ValueError("give the prompt once: as PROMPT or as --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    prompt = "\n" if prompt is None else prompt
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    settings = sampling_settings(args)  # bad flags fail before anything is loaded
    stops = [unescape(s) for s in args.stop]
    if args.model:
        if not Path(args.model).is_dir():
            raise FileNotFoundError(
                f"--model {args.model}: no such folder; pass a run folder written by `lmps train`"
            )
        trained = model_io.load(Path(args.model))
    else:
        trained = model_io.fetch_model(args.coordinator, args.job or "", wait=False)
    tokens, seconds, first_s, cached = 0, 0.0, 0.0, 0
    for i in range(args.samples):
        if args.samples > 1:
            console.rule(f"sample {i + 1}")
        seeded = dataclasses.replace(settings, seed=args.seed + i)
        if not args.no_stream:
            _write(prompt)
        done = generate_text(
            trained.model,
            trained.tokenizer,
            prompt,
            seeded,
            stops=stops,
            stop_at_eot=args.stop_at_eot,
            on_text=None if args.no_stream else _write,
        )
        _write((prompt + done.text if args.no_stream else "") + "\n")
        tokens, seconds = tokens + done.tokens, seconds + done.seconds
        first_s, cached = first_s + done.first_token_s, cached + done.cached_steps
    cache = f"KV cache on, {cached}/{tokens} steps cached" if settings.use_cache else "no KV cache"
    rate = tokens / seconds if seconds > 0 else 0.0
    print(
        f"{tokens} tokens in {seconds:.2f}s: {rate:.1f} tokens/s ({cache}; first token "
        f"{first_s / args.samples * 1000:.0f} ms)",
        file=sys.stderr,
    )
    return 0


def _write(text: str) -> None:
    """Text to stdout at once: each streamed piece shows as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_export(args: argparse.Namespace) -> int:
    from lmps.client import model_io

    from_cluster = args.job is not None
    want = 1 if from_cluster else 2
    if len(args.paths) != want:
        usage = "--job JOB OUT" if from_cluster else "RUN_DIR OUT (or --job JOB OUT)"
        raise ValueError(f"export takes {usage}, got {' '.join(args.paths)}")
    out = Path(args.paths[-1])
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        what = "a file" if not out.is_dir() else "not empty"
        raise ValueError(f"{out} is {what}: choose a new folder (or --force to write into it)")
    if not from_cluster:
        model_io.check(Path(args.paths[0]))
    if args.format == "hf":
        from lmps.client import hf_io

        hf_io.transformers_module()  # before anything is fetched or loaded
    if from_cluster:
        trained = model_io.fetch_model(args.coordinator, args.job, wait=False)
        source = f"job {args.job or '(latest)'} at {args.coordinator}"
    else:
        trained = model_io.load(Path(args.paths[0]))
        source = args.paths[0]
    if args.format == "hf":
        hf_io.save(trained, out)
        hint = f"GPT2LMHeadModel.from_pretrained({str(out)!r})"
    else:
        model_io.save(trained, out)
        hint = f"lmps generate --model {out}"
    console.print(
        f"exported {source} to {out} ({args.format}); load it with {hint}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lmps.client.report import render, summarize

    for line in render(summarize(Path(args.run_dir))):
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from lmps.client import inspect

    inspect.show_status(args.coordinator, console)
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from lmps.client import inspect

    inspect.show_shards(args.coordinator, args.job, console, stats=not args.no_stats)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from lmps.client.launcher import wait_healthy

    try:
        wait_healthy(args.address, timeout_s=args.timeout, service=args.service)
    except TimeoutError as err:
        print(err, file=sys.stderr)
        return 1
    print("SERVING")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from lmps.client.certs import make_dev_pki, usage

    try:
        pki = make_dev_pki(Path(args.out), args.hosts, days=args.days, force=args.force)
    except FileExistsError as err:
        console.print(f"[red]error[/] {err}")
        return 1
    print(usage(pki))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmps.core.data import prepare_corpus

    corpus = prepare_corpus(args.data, args.vocab_size, args.eval_fraction, Path(args.cache_dir))
    console.print(
        f"{args.data}: vocab {corpus.vocab_size}, {corpus.train.numel():,} train and "
        f"{corpus.eval.numel():,} eval tokens (cached in {args.cache_dir})"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lmps.client.launcher import ClusterSpec, LocalCluster
    from lmps.client.train import train

    out = args.out or "runs/demo"
    spec = ClusterSpec(servers=2, workers=2, run_dir=str(Path(out) / "logs"))
    console.rule("lmps demo: 1 coordinator, 2 parameter servers, 2 workers on 127.0.0.1")
    with console.status("starting the cluster"):
        cluster = LocalCluster(spec).start()
    try:
        for p in cluster.procs:
            console.print(f"  {p.name:<12} {p.address:<18} pid {p.pid}  log {p.log}")
        opts = options_from_args(
            args,
            coordinator=cluster.coordinator,
            out=out,
            sample_prompt=args.sample_prompt or "The for statement",
        )
        report = train(opts, console)
        wall = float(report["wall_s"])  # type: ignore[arg-type]
        if opts.task == "lm":
            wall += _demo_classifier(opts, out)
        console.print(f"demo finished in {wall:.0f}s; model in {out}")
    finally:
        codes = cluster.stop()
        bad = {k: v for k, v in codes.items() if v != 0}
        if bad:
            console.print(f"[yellow]unclean exits: {bad}[/]")
    return 0


DEMO_TEXT = "Use a for loop to go over the items of a list, and break to leave it early."
"""What the demo's classifier is asked about (a sentence of no pydoc topic)."""


def _demo_classifier(opts: TrainOptions, out: str) -> float:
    """The demo's second act on the same cluster: fine-tune the model just trained at `out`
    into a classifier of builtin:pydoc-topics (`--init-from OUT --task classify`), say its
    accuracy against the majority-class baseline, and classify `DEMO_TEXT` with
    `lmps predict`. Returns the seconds it took."""
    from lmps.client.cli import main
    from lmps.client.train import train
    from lmps.core.pydoc_topics import BUILTIN_PYDOC_TOPICS

    started = time.perf_counter()
    classifier = f"{out}-classify"
    console.rule(f"fine-tune {out} into a classifier of {BUILTIN_PYDOC_TOPICS}")
    tuned = dataclasses.replace(
        opts,
        name="demo-classify",
        task="classify",
        data=BUILTIN_PYDOC_TOPICS,
        init_from=out,
        out=classifier,
        preset="",  # --init-from fixes the shape and the tokenizer
        vocab_size=0,
        block_size=0,
        pooling="mean",
        epochs=3,
        lr=2e-3,
        min_lr=1e-4,
        warmup_steps=5,
        eval_fraction=0.1,
        sample_prompt="",
    )
    report = train(tuned, console)
    accuracy, baseline = report.get("eval_accuracy"), report.get("majority_baseline")
    if isinstance(accuracy, float) and isinstance(baseline, float):
        console.print(
            f"classifier: [bold]{accuracy:.1%}[/] of the held-out passages right; always "
            f"answering the most common topic would get {baseline:.1%}"
        )
    argv = ["predict", "--model", classifier, DEMO_TEXT, "--top", "2"]
    console.print(f"$ lmps {shlex.join(argv)}", markup=False, highlight=False, soft_wrap=True)
    main(argv)
    return time.perf_counter() - started
