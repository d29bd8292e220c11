"""`cscctrl`: one console script, one subcommand per stage of the pipeline.

Each subcommand lives in the module that owns it and exposes ``add_arguments(parser)`` and
``main(args) -> int``; this file only wires them, importing a module only when its command runs, so that
`cscctrl --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("sharding.cli_shard", "image folder / ImageNet / Fashion-MNIST / demo photos -> WebDataset shards + parquet manifest"),
    "verify": ("sharding.cli_verify", "re-read shards against their manifest; report missing, truncated or altered shards"),
    "train": ("pipeline.launch", "CTRL training on Ray Train (resumes when the run name exists)"),
    "tune": ("tuning.sweep", "Ray Tune sweep over sparsity / unrolling / optimisation hyperparameters"),
    "eval": ("pipeline.evaluate", "metrics and pictures of a trained model on any shard set"),
    "run": ("pipeline.workflow", "the whole pipeline as cached, resumable stages from a workflow file"),
    "demo": ("pipeline.demo", "the bundled end-to-end demo on the embedded default data (minutes on a CPU)"),
}

EPILOG = """\
Every command also runs as `python -m pipeline COMMAND ...`; `cscctrl COMMAND --help` explains its options.
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
    parser = build_parser()
    # Find the subcommand first so only its module is imported.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None or command not in COMMANDS:
        if command is not None:
            parser.error(f"unknown command {command!r}; choose from: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if ("-h" in argv or "--help" in argv or not argv) else 2
    module = importlib.import_module(COMMANDS[command][0])
    sub = argparse.ArgumentParser(prog=f"cscctrl {command}", description=COMMANDS[command][1],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    args = sub.parse_args(argv[argv.index(command) + 1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
