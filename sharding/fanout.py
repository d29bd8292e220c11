"""Shards of one plan written by Ray tasks over disjoint ranges of shard indices.

    results = shard_on_ray(plan, dest, tasks=8)   # after prepare_destination, before finalize

Each task writes whole shards through fsspec, so on several nodes DEST must be shared storage (s3://,
gs://, an NFS mount). Shard i's bytes depend only on the plan (sharding/write.py), so the result is
byte-identical to one process writing the plan, whatever the number of tasks or nodes. Tasks send sample
counts to a small actor; the driver's progress bar shows their sum.

Ray is joined as it is found: an initialised Ray is used as it is; otherwise the cluster named by
RAY_ADDRESS, else a private local one (never Ray's implicit attach to whatever /tmp/ray last recorded).
"""
from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

from sharding.plan import ShardPlan
from sharding.storage import Destination
from sharding.write import WriteReport, finished_result, write_shard

PROGRESS_EVERY = 32  # samples between progress messages of a sharding task
POLL_S = 0.5  # seconds between progress-bar updates of the driver


class ProgressCounter:
    """A Ray actor the sharding tasks send sample counts to; the driver reads the total."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def total(self) -> int:
        return self.count


def split_ranges(num_shards: int, tasks: int) -> list[list[int]]:
    """``tasks`` contiguous, disjoint ranges covering 0..num_shards-1 (sizes differ by at most one)."""
    tasks = max(1, min(tasks, num_shards))
    bounds = [round(t * num_shards / tasks) for t in range(tasks + 1)]
    return [list(range(bounds[t], bounds[t + 1])) for t in range(tasks) if bounds[t + 1] > bounds[t]]


def write_range(plan: ShardPlan, dest: Destination, indices: list[int], counter: Any) -> dict[str, Any]:
    """One Ray task: write shards ``indices`` of ``plan`` (finished ones are skipped), reporting every
    PROGRESS_EVERY samples to ``counter``. Returns the node it ran on and what it wrote."""
    import ray

    pending = 0

    def tick() -> None:
        nonlocal pending
        pending += 1
        if pending >= PROGRESS_EVERY:
            counter.add.remote(pending)
            pending = 0

    written, skipped = [], []
    for i in indices:
        spec = plan.shards[i]
        if finished_result(spec, dest) is not None:
            skipped.append(i)
            counter.add.remote(len(spec.items))
            continue
        write_shard(plan.source, spec, dest, plan.image_options, plan.label_names, on_sample=tick)
        written.append(i)
    counter.add.remote(pending)
    return {"node": ray.get_runtime_context().get_node_id(), "written": written, "skipped": skipped}


def join_ray() -> None:
    """Use an initialised Ray; else join RAY_ADDRESS's cluster, else start a private local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)


def shard_on_ray(plan: ShardPlan, dest: Destination, tasks: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Fan the shards of ``plan`` out as Ray tasks (1 CPU each, spread over the nodes; ``tasks`` = 0: one per
    CPU of the cluster, at most one per shard); returns each task's {node, written, skipped}.
    ``prepare_destination`` must have run; ``finalize`` comes after."""
    import ray

    join_ray()
    if tasks <= 0:
        tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Any: Ray types an actor handle's methods as having .remote only when each is decorated with @ray.method
    counter: Any = ray.remote(num_cpus=0)(ProgressCounter).remote()
    task = ray.remote(num_cpus=1, max_retries=2)(write_range)
    plan_ref = ray.put(plan)
    refs = [task.options(scheduling_strategy="SPREAD").remote(plan_ref, dest, r, counter)
            for r in split_ranges(len(plan.shards), tasks)]
    total = sum(len(s.items) for s in plan.shards)
    with tqdm(total=total, unit="img", desc="shard", disable=not progress, dynamic_ncols=True) as bar:
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            bar.update(ray.get(counter.total.remote()) - bar.n)
        results = ray.get(refs)
        bar.update(ray.get(counter.total.remote()) - bar.n)
    ray.kill(counter)
    return results


def write_report(plan: ShardPlan, dest: Destination, results: list[dict[str, Any]], seconds: float) -> WriteReport:
    """The WriteReport of a fan-out (what `cscctrl shard` prints), from the tasks' results and the records
    of the shards they wrote."""
    report = WriteReport(seconds=seconds)
    for r in results:
        report.written += r["written"]
        report.skipped += r["skipped"]
    report.written.sort()
    report.skipped.sort()
    for i in report.written:
        record = finished_result(plan.shards[i], dest)
        if record is not None:
            report.samples += record.samples
            report.rejected += len(record.rejected_rows)
            report.bytes += record.bytes
    return report
