"""The ``genrecls`` command line: parses arguments and calls the library, nothing more.

Every command that runs work accepts ``--config FILE`` (TOML or JSON) and repeatable
``--set section.key=value`` overrides; dedicated flags (``--epochs``...) are shortcuts for
the same overrides.  Exit codes: 0 success, 1 the run finished with failures under
``--strict`` (or a retrain kept the champion, see ``retrain``), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from . import __version__

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
    """Register ``add_arguments`` and ``run`` functions for a sub-command."""

    def deco(fn_pair):
        add, run = fn_pair()
        COMMANDS[name] = (add, run, help)
        return fn_pair

    return deco


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="configuration file (TOML or JSON; a run's config.json works)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one configuration value (repeatable), e.g. --set features.n_mels=64")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray")
    p.add_argument("--workers", type=int, help="CPUs (local Ray) or concurrent tasks (cluster) to use; default: all")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray and TensorFlow logs")


def resolve_config(args: argparse.Namespace, extra: list[str] | None = None):
    from .config import load_config

    return load_config(getattr(args, "config", None), list(getattr(args, "overrides", []) or []) + list(extra or []))


# -- sample-data ------------------------------------------------------------------------
@command("sample-data", "write a small synthetic labelled collection (MP3, WAV, FLAC, OGG)")
def _sample_data():
    def add(p):
        from .sample_data import GENRES

        p.add_argument("out", help="folder to write OUT/<genre>/<track>.<ext> into")
        p.add_argument("--genres", type=int, default=4, help=f"number of genres (1-{len(GENRES)}, default 4)")
        p.add_argument("--tracks-per-genre", type=int, default=8, help="tracks per genre (default 8)")
        p.add_argument("--seconds", type=float, default=30.0, help="length of each track in seconds (default 30)")
        p.add_argument("--formats", default="mp3,wav,flac,ogg", help="comma-separated formats to rotate through")
        p.add_argument("--seed", type=int, default=0)

    def run(a):
        from .sample_data import make_sample_collection

        paths = make_sample_collection(a.out, genres=a.genres, tracks_per_genre=a.tracks_per_genre, seconds=a.seconds,
                                       formats=tuple(x.strip() for x in a.formats.split(",") if x.strip()), seed=a.seed)
        print(f"wrote {len(paths)} tracks ({a.genres} genres x {a.tracks_per_genre}, {a.seconds:g} s each) to {a.out}")
        return EXIT_OK

    return add, run


# -- ingest -----------------------------------------------------------------------------
@command("ingest", "decode, segment and featurise a library into Parquet shards (Ray tasks)")
def _ingest():
    def add(p):
        p.add_argument("source", help="library folder laid out as SOURCE/<label>/**/<file>, or a CSV/Parquet manifest (path[,label])")
        p.add_argument("--out", required=True, help="dataset folder or URI (s3://, gs://)")
        p.add_argument("--root", help="root for relative paths in a manifest (default: the manifest's folder)")
        p.add_argument("--strict", action="store_true", help="exit 1 if any file failed")
        p.add_argument("--retry-failed", action="store_true", help="retry files whose failure is recorded even if unchanged")
        p.add_argument("--prune", action="store_true", help="drop tracks that vanished from the source")
        add_config_args(p)
        add_ray_args(p)

    def run(a):
        from .dataset import Dataset
        from .ingest import format_summary, ingest

        extra = []
        if a.strict:
            extra.append("ingest.strict=true")
        if a.retry_failed:
            extra.append("ingest.retry_failed=true")
        cfg = resolve_config(a, extra)
        summary = ingest(a.source, a.out, cfg, address=a.address, workers=a.workers, root=a.root,
                         prune=a.prune, progress=not a.quiet, verbose=a.verbose)
        print(format_summary(summary, Dataset(a.out)))
        if cfg.ingest.strict and summary.failed:
            print(f"--strict: {summary.failed} file(s) failed", file=sys.stderr)
            return EXIT_FAILURES
        return EXIT_OK

    return add, run


# -- inspect ----------------------------------------------------------------------------
@command("inspect", "show a dataset: tracks and segments per label, failures by reason, features")
def _inspect():
    def add(p):
        p.add_argument("dataset")
        p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    def run(a):
        from .dataset import Dataset
        from .ingest import describe

        ds = Dataset(a.dataset)
        if a.json:
            print(json.dumps(ds.manifest(), indent=2))
        else:
            print(describe(ds))
        return EXIT_OK

    return add, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrecls", description="Music genre classification at library scale, with Ray.")
    parser.add_argument("--version", action="version", version=f"genrecls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add, run, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .runtime import quiet_environment

    quiet_environment(verbose="-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError
    from .dataset import DatasetError
    from .storage import LockedError

    try:
        return args._run(args)
    except (ConfigError, DatasetError, LockedError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as exc:
        print(f"genrecls {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"genrecls {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
