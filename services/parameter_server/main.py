"""`lmps serve ps`: run one parameter server."""

from __future__ import annotations

import argparse
import logging

from lmps.rpc.bootstrap import Service, advertised_address, run_until_signal, start_server
from lmps.rpc.flags import HelpFormatter, add_serve_flags, run_service, serve_options, setup_logging
from lmps.rpc.malloc import tune_malloc
from lmps.rpc.metrics import process_registry
from lmps.rpc.registration import Registration
from lmps.v1 import coordinator_pb2

log = logging.getLogger("lmps.ps")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="lmps serve ps", formatter_class=HelpFormatter)
    parser.epilog = "example:\n  lmps serve ps --coordinator coord:50051 --id ps-0 --port 50061"
    # SYNC: the description says when updates run; a new mode words it from the job's mode.
    parser.description = (
        "Run a parameter server: holds fp32 parameter shards and optimizer state, applies "
        "updates when every worker has pushed. Registers with the coordinator."
    )
    add_serve_flags(parser, port=50061, metrics_port=9101, member=True)
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args or build_parser().parse_args(argv)
    # Imported here, not at the top: `build_parser` (every `--help`) stays torch-free.
    from lmps.services.parameter_server.metrics import ServerMetrics
    from lmps.services.parameter_server.servicer import ParameterServicer, add_to_server
    from lmps.services.parameter_server.store import ParameterStore

    setup_logging(args.log_level)
    tune_malloc()  # before the first shard is allocated
    store = ParameterStore(server_id=args.id or "ps")
    metrics = process_registry()  # this role's series only (docs/metrics.md)
    running = start_server(
        serve_options(args),
        [
            Service(
                "lmps.v1.ParameterService",
                add_to_server,
                ParameterServicer(store, ServerMetrics(metrics)),
            )
        ],
        registry=metrics,
    )
    address = advertised_address(args.host, running.port, args.advertise)
    member = Registration(args.coordinator, coordinator_pb2.PARAMETER_SERVER, address, args.id)
    store.server_id = member.register()
    member.start()
    running.on_stop.append(member.stop)
    running.on_stop.append(store.close)  # wake waiting pulls so shutdown takes seconds
    return run_until_signal(running)


if __name__ == "__main__":
    raise SystemExit(run_service(main, "lmps serve ps"))
