"""How many trials fit on the cluster at once, decided before any trial starts.

A trial is two things on Ray (Train V2): the Tune trial actor running the driver function (it only
launches and watches the run, so it reserves a fraction of a CPU), and the Ray Train worker group the
driver starts, whose placement group Ray Train reserves outside Tune's. Tune knows only the first, so
left alone it starts as many drivers as there are CPUs and their worker groups wait for each other,
forever on a small machine. So ``max_concurrent_trials`` is the number of whole trials (driver +
workers) that first-fit packing places on the cluster's nodes; a trial that fits nowhere is an error.
The count is taken from the live nodes when the sweep starts: on an autoscaling cluster, have the
worker nodes up first (min_workers), or the sweep is refused or runs fewer trials at once.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

EPS = 1e-9  # slack for fractional resources (0.1 + 0.9 must fit in 1 CPU)


class ResourceError(ValueError):
    """No trial can ever get its resources on this cluster; the message gives the arithmetic."""


@dataclass(frozen=True)
class TrialResources:
    driver_cpus: float
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0

    def worker_bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    def bundles(self) -> list[dict[str, float]]:
        """The driver's bundle, then one per worker."""
        return [{"CPU": self.driver_cpus}] + [self.worker_bundle()] * self.num_workers

    def total(self) -> dict[str, float]:
        return {"CPU": self.driver_cpus + self.num_workers * self.cpus_per_worker,
                "GPU": self.num_workers * self.gpus_per_worker}

    def describe(self) -> str:
        gpu = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (f"driver {self.driver_cpus:g} CPU + {self.num_workers} worker(s) × ({self.cpus_per_worker:g} CPU"
                f"{gpu}) = {self.total()['CPU']:g} CPU, {self.total()['GPU']:g} GPU")


def _fits(bundle: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in bundle.items() if v > 0)


def _place(bundles: Sequence[Mapping[str, float]], nodes: list[dict[str, float]]) -> bool:
    """First-fit the bundles onto ``nodes`` (free resources, updated in place when all fit). A bundle
    without GPUs tries the nodes without GPUs first, as Ray's scheduler does (it keeps GPU nodes for
    GPU work), so the drivers do not take the CPUs that GPU workers need."""
    trial = [dict(n) for n in nodes]
    for bundle in bundles:
        wants_gpu = bundle.get("GPU", 0.0) > 0
        order = sorted(trial, key=lambda n: (not wants_gpu and n.get("GPU", 0.0) > 0))
        node = next((n for n in order if _fits(bundle, n)), None)
        if node is None:
            return False
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    nodes[:] = trial
    return True


def trials_that_fit(trial: TrialResources, nodes: Sequence[Mapping[str, float]], limit: int = 10_000) -> int:
    """How many copies of ``trial`` first-fit packing places on ``nodes`` (each node's CPU/GPU totals)."""
    free = [{k: float(v) for k, v in n.items()} for n in nodes]
    count = 0
    while count < limit and _place(trial.bundles(), free):
        count += 1
    return count


def max_concurrent_trials(trial: TrialResources, nodes: Sequence[Mapping[str, float]], requested: int = 0,
                          num_trials: int = 0) -> tuple[int, str]:
    """(concurrency, note). ``requested`` 0 = derived; a request above what fits is lowered (note says
    so); ``num_trials`` > 0 caps it further. Raises ResourceError when not even one trial fits."""
    fit = trials_that_fit(trial, nodes)
    if fit == 0:
        raise ResourceError(_explain_no_fit(trial, nodes))
    note = ""
    n = fit
    if requested:
        if requested > fit:
            note = (f"max_concurrent_trials={requested} lowered to {fit}: the cluster holds {fit} trial(s) of "
                    f"{trial.describe()} at once")
        n = min(requested, fit)
    if num_trials:
        n = min(n, num_trials)
    return n, note


def _explain_no_fit(trial: TrialResources, nodes: Sequence[Mapping[str, float]]) -> str:
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    need = trial.total()
    biggest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU")}
    lines = [f"no trial can get its resources: one trial needs {trial.describe()}; the Ray cluster has "
             f"{total['CPU']:g} CPU, {total['GPU']:g} GPU over {len(nodes)} node(s)"]
    bundle = trial.worker_bundle()
    if not any(_fits(bundle, n) for n in nodes):
        lines.append(f"no node can hold even one worker ({bundle}; the largest node has {biggest['CPU']:g} CPU, "
                     f"{biggest['GPU']:g} GPU)")
    elif need["CPU"] > total["CPU"] + EPS or need["GPU"] > total["GPU"] + EPS:
        lines.append("the trial needs more than the whole cluster")
    lines.append("lower resources.num_workers / cpus_per_worker / gpus_per_worker, or add nodes")
    return "; ".join(lines)


def node_resources(nodes: Sequence[Mapping[str, object]]) -> list[dict[str, float]]:
    """``ray.nodes()`` -> [{'CPU': c, 'GPU': g}] of the live nodes."""
    out = []
    for node in nodes:
        if not node.get("Alive", False):
            continue
        res = node.get("Resources", {}) or {}
        out.append({"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))})  # type: ignore[union-attr]
    return out
