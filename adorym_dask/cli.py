"""Command line: ``adorym-dask reconstruct|simulate|demo|cluster|inspect|convert``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from adorym_dask.config import ConfigError
from adorym_dask.engine import DivergenceError
from adorym_dask.parameters import ProbeError
from adorym_dask.storage.checkpoint import CheckpointError
from adorym_dask.storage.measurements import MeasurementError
from adorym_dask.storage.object_store import StoreError
from adorym_dask.storage.results import OutputError
from adorym_dask.storage.support import SupportError

USER_ERRORS = (
    ConfigError, MeasurementError, OutputError, ProbeError, CheckpointError, StoreError,
    SupportError, DivergenceError,
)


def _reconstruct(args: argparse.Namespace) -> int:
    from adorym_dask.api import reconstruct
    from adorym_dask.plotting import save_run_pngs

    result = reconstruct(
        args.config, overrides=args.set, resume=args.resume,
        allow_config_change=args.allow_config_change,
    )
    print(f"wrote {result.output}  (final loss {result.loss[-1]:.5g})")
    png = args.png or default_png(result.output)
    if png and not args.no_png:
        for path in save_run_pngs(png, result):
            print(f"wrote {path}")
    return 0


def default_png(output) -> Path | None:
    """``run.zarr`` -> ``run.png`` beside it (None for a URL output: pass --png)."""
    from adorym_dask.storage import location

    if location.is_url(str(output)):
        return None
    out = Path(output)
    return out.with_name(f"{out.name.removesuffix('.zarr').removesuffix('.h5')}.png")


def _demo(args: argparse.Namespace) -> int:
    from adorym_dask.demo import run_demo

    run_demo(Path(args.folder), epochs=args.epochs, n_workers=args.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from adorym_dask.cluster_command import add_cluster_arguments, run_cluster
    from adorym_dask.convert import add_convert_arguments, run_convert
    from adorym_dask.inspect import add_inspect_arguments, run_inspect
    from adorym_dask.simulate import add_simulate_arguments, run_simulate

    parser = argparse.ArgumentParser(prog="adorym-dask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="run a reconstruction from a YAML run file")
    rec.add_argument("config", help="run file (YAML)")
    rec.add_argument(
        "--set", action="append", default=[], metavar="KEY.SUB=VALUE",
        help="override a config value, e.g. --set optimizer.step_size=0.02 (repeatable)",
    )
    rec.add_argument("--png", help="the summary picture (default: beside the output, "
                     "run.zarr -> run.png)")
    rec.add_argument("--no-png", action="store_true", help="no summary picture")
    rec.add_argument("-q", "--quiet", action="store_true",
                     help="no log lines (the loss and refined parameters of each epoch)")
    rec.add_argument(
        "--resume", action="store_true",
        help="continue the run stored at the config's output from its last commit",
    )
    rec.add_argument(
        "--allow-config-change", action="store_true",
        help="with --resume: continue even if science settings differ from the stored run's",
    )
    rec.set_defaults(func=_reconstruct)
    sim = sub.add_parser("simulate", help="write a simulated measurement file")
    add_simulate_arguments(sim)
    sim.set_defaults(func=run_simulate)
    demo = sub.add_parser("demo", help="simulate a small dataset and reconstruct it")
    demo.add_argument("--folder", default=".", help="where demo.zarr and demo.png go")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--workers", type=int, default=2)
    demo.set_defaults(func=_demo)
    clu = sub.add_parser("cluster", help="start a dask-jobqueue cluster (SLURM, PBS, SGE) and "
                         "keep it for several runs (cluster: {address: ...})")
    add_cluster_arguments(clu)
    clu.set_defaults(func=run_cluster)
    ins = sub.add_parser("inspect", help="describe a run store or a measurement file")
    add_inspect_arguments(ins)
    ins.set_defaults(func=run_inspect)
    con = sub.add_parser("convert", help="convert CXI, Adorym HDF5 or Data Exchange files to "
                         "the native layout")
    add_convert_arguments(con)
    con.set_defaults(func=run_convert)
    return parser


def _log_to_stderr(quiet: bool) -> None:
    """The package's log (data conversions, refined parameters each epoch) on stderr."""
    logger = logging.getLogger("adorym_dask")
    if quiet or any(getattr(h, "_adorym_cli", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler._adorym_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"adorym-dask: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
