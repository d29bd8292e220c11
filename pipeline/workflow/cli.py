"""`cscctrl run WORKFLOW.yaml [key=value ...]`: the command line of the workflow runner."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import yaml

from pipeline.config import ConfigError
from pipeline.workflow.records import summary_text
from pipeline.workflow.runner import run_workflow, tracking_uri
from pipeline.workflow.spec import STAGES, WORKFLOW_DIR, StageFailed, Workflow, WorkflowError, load_workflow

HELP_EPILOG = """\
examples:
  cscctrl run demo                                   # pipeline/workflows/demo.yaml on the embedded default
  cscctrl run fashion_mnist storage=/data/runs train.steps=2000
  cscctrl run imagenet128_cluster.yaml --from train  # train again (and evaluate, register) with cached shards
  cscctrl run my_workflow.yaml --print-plan          # the resolved workflow and its stages; nothing runs

key=value items: a config section key (train.steps=50, model.lam=0.05) overrides the training config;
sweep.FIELD=value sets a sweep field or base key (sweep.num_samples=4); any other key is a dotted path of
the workflow file (storage=..., shards.tasks=8, register.alias=staging). Re-running the same workflow
skips stages whose inputs did not change and resumes an interrupted one. See docs/workflow.md.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = HELP_EPILOG
    p.add_argument("workflow", metavar="WORKFLOW.yaml", help="workflow file, or the name of a bundled one "
                                                              f"({', '.join(sorted(q.stem for q in WORKFLOW_DIR.glob('*.yaml')))})")
    p.add_argument("items", nargs="*", metavar="key=value", help="overrides of the workflow file")
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help=f"run this stage and every later one again ({', '.join(STAGES)})")
    p.add_argument("--print-plan", action="store_true", help="print the resolved workflow and exit (writes nothing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def plan_text(wf: Workflow) -> str:
    """The resolved workflow and its stages, as YAML; computing it creates no file or folder."""
    # (The resolved values have keys of their own: the file's tracking_uri and shards would hide them.)
    doc = {"stages": wf.stages, "resolved_tracking_uri": tracking_uri(wf, create=False), "shard_url": wf.shard_url,
           **dataclasses.asdict(wf)}
    return yaml.safe_dump(doc, sort_keys=False)


def main(args: argparse.Namespace) -> int:
    return run(args.workflow, args.items, from_stage=args.from_stage, print_plan=args.print_plan,
               progress=not args.no_progress)


def run(workflow: str, items: list[str], *, from_stage: str | None = None, print_plan: bool = False,
        progress: bool = True) -> int:
    """`cscctrl run`: load the workflow, then print its plan or run it; the exit code (2: bad input, 1: a
    stage failed)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        wf = load_workflow(workflow, items)
        if print_plan:
            print(plan_text(wf), end="")
            return 0
        outcomes = run_workflow(wf, from_stage, progress=progress)
    except (WorkflowError, ConfigError, FileNotFoundError, ConnectionError) as e:
        print(f"cscctrl run: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"cscctrl run: {e}\n(completed stages are recorded in {wf.state_dir}/stages.json and are "
              f"reused when the workflow runs again)", file=sys.stderr)
        return 1
    print(summary_text(wf, outcomes), end="", flush=True)
    return 0
