"""Starting or joining Ray: the one way every command (train, tune, run, demo) does it."""
from __future__ import annotations

import os

RAY_TRAIN_POLL_S = 0.25  # seconds between Ray Train controller polls on a cluster this process starts


def init_ray(log_to_driver: bool = True, *, tune: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (which `ray job submit` sets for its driver), else start a
    private local one: never Ray's implicit attach to whatever /tmp/ray last recorded, which may be a
    dead cluster (ray.init then waits forever). No runtime_env: inside `ray job submit` it would have to
    merge with the job's own; a local cluster's workers inherit this process's environment.

    ``tune``: Ray Tune's own progress output off (a sweep prints its own trial table). Does nothing when
    Ray is already initialised in this process."""
    import ray

    if tune:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # A local cluster's processes inherit this environment (ray_cluster*.yaml set the same on a cluster):
    # - Ray Train's controller takes one ray.train.report per worker per poll, every 2 s by default: a
    #   worker reporting more often waits;
    # - Ray Train's print patch sends a worker's print to its logger and, as sys.stdout is wrapped in a
    #   Ray worker, to the stream as well: every progress line reached the terminal twice.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(RAY_TRAIN_POLL_S))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=log_to_driver)
