"""`cscctrl`: one console script, one subcommand per stage of the pipeline.

Each subcommand lives in the module that owns it and exposes ``add_arguments(parser)`` and
``main(args) -> int``; this file only wires them, importing a module only when its command runs, so that
`cscctrl --help` stays fast. Every command ends in one line on an error (pipeline/errors.py: what failed,
the file or key, the way out; exit 2 for bad input, 1 otherwise); ``--debug`` anywhere on the command
line (or CSCCTRL_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from pipeline.errors import DEBUG_HINT, describe, exit_code
from pipeline.redact import RedactingStream, redact

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("sharding.cli_shard", "image folder / ImageNet / Fashion-MNIST / demo photos -> WebDataset shards + parquet manifest"),
    "verify": ("sharding.cli_verify", "re-read shards against their manifest; report missing, truncated or altered shards"),
    "train": ("pipeline.launch", "CTRL training on Ray Train (resumes when the run name exists)"),
    "tune": ("tuning.sweep", "Ray Tune sweep over sparsity / unrolling / optimisation hyperparameters"),
    "eval": ("pipeline.evaluate", "metrics and pictures of a trained model on any shard set"),
    "encode": ("pipeline.encode", "features z (and per-stage sparsity, labels, keys) of a shard set or an image "
                                  "folder -> parquet"),
    "reconstruct": ("pipeline.reconstruct", "reconstructions (and input|reconstruction pairs) of a folder of "
                                            "images of any size"),
    "run": ("pipeline.workflow", "the whole pipeline as cached, resumable stages from a workflow file"),
    "demo": ("pipeline.demo", "the bundled end-to-end demo on the embedded default data (minutes on a CPU)"),
}

INVOCATION = ""
"""The `cscctrl` command line being run in this process ('' outside one): see ``invocation``."""

EPILOG = """\
Every command also runs as `python -m pipeline COMMAND ...`; `cscctrl COMMAND --help` explains its options.
--debug (anywhere on the command line): show the Python traceback of an error instead of its one-line summary.
Method: X. Dai et al., "Closed-Loop Transcription via Convolutional Sparse Coding", arXiv 2302.09347.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cscctrl",
        description="Train the CSC-CTRL autoencoder (convolutional sparse coding + closed-loop transcription) "
                    "from WebDataset shards on Ray, tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        # Listed for the top-level help; a command's own arguments are added when it runs (main).
        sub.add_parser(name, help=help_, description=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CSCCTRL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # Find the subcommand first so only its module is imported.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None or command not in COMMANDS:
        if command is not None:
            parser.error(f"unknown command {command!r}; choose from: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if ("-h" in argv or "--help" in argv or not argv) else 2
    global INVOCATION
    INVOCATION = "cscctrl " + shlex.join(argv)  # the run's MLflow description names it (tracking.command)
    module = importlib.import_module(COMMANDS[command][0])
    sub = argparse.ArgumentParser(prog=f"cscctrl {command}", description=COMMANDS[command][1],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    # Intermixed: options may come between the positionals and the key=value items
    # (`cscctrl run demo --no-progress storage=/tmp/x`), not only before or after all of them.
    args = sub.parse_intermixed_args(argv[argv.index(command) + 1:])

    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)  # no URL credentials echoed
    try:
        return run_command(module, command, args, debug)
    finally:
        sys.stdout, sys.stderr = streams
        INVOCATION = ""


def invocation() -> str:
    """The command line of the `cscctrl` command running in this process (as typed, after --debug is
    removed), else this process's own command line; credentials in URLs removed."""
    return redact(INVOCATION or shlex.join([os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]]))


def run_command(module: object, command: str, args: argparse.Namespace, debug: bool) -> int:
    """The command's main; an error ends in one line (pipeline/errors.py), or its traceback with --debug."""
    if debug:
        return int(module.main(args) or 0)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(f"cscctrl {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every command ends in one line, never in a traceback
        print(f"cscctrl {command}: error: {describe(e)} {DEBUG_HINT}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
