"""max_concurrent_trials: whole trials (driver + Ray Train workers) that fit at once, so none starves;
a trial that can never fit is an error that shows the arithmetic."""
from __future__ import annotations

import math

import pytest

from tuning.resources import ResourceError, TrialResources, max_concurrent_trials, node_resources, trials_that_fit


@pytest.mark.parametrize("cpus, driver, workers, cpw", [
    (2, 0.1, 1, 0.9), (2, 0.1, 1, 1.0), (2, 0.25, 1, 0.5), (16, 0.1, 2, 1.0), (8, 0.5, 3, 1.5), (64, 0.1, 4, 3.0),
])
def test_one_cpu_node_matches_the_closed_form(cpus, driver, workers, cpw):
    """One node, CPUs only: floor(cpus / (driver + workers × cpw)) trials."""
    trial = TrialResources(driver_cpus=driver, num_workers=workers, cpus_per_worker=cpw)
    expected = math.floor(cpus / (driver + workers * cpw) + 1e-9)
    assert trials_that_fit(trial, [{"CPU": cpus, "GPU": 0}]) == expected


def test_two_cpu_laptop():
    fractional = TrialResources(driver_cpus=0.1, num_workers=1, cpus_per_worker=0.9)
    assert max_concurrent_trials(fractional, [{"CPU": 2.0, "GPU": 0.0}]) == (2, "")
    whole = TrialResources(driver_cpus=0.1, num_workers=1, cpus_per_worker=1.0)
    assert max_concurrent_trials(whole, [{"CPU": 2.0, "GPU": 0.0}]) == (1, "")   # 2 × 1.1 > 2
    with pytest.raises(ResourceError) as e:
        max_concurrent_trials(TrialResources(0.1, 2, 1.0), [{"CPU": 2.0, "GPU": 0.0}])
    msg = str(e.value)
    assert "driver 0.1 CPU + 2 worker(s) × (1 CPU) = 2.1 CPU" in msg and "has 2 CPU, 0 GPU" in msg


def test_gpu_cluster_is_limited_by_gpus_not_cpus():
    nodes = [{"CPU": 32.0, "GPU": 8.0}, {"CPU": 32.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 0.0}]
    four_gpu = TrialResources(driver_cpus=0.1, num_workers=4, cpus_per_worker=4.0, gpus_per_worker=1.0)
    assert max_concurrent_trials(four_gpu, nodes)[0] == 4                      # 16 GPUs / 4
    three_gpu = TrialResources(driver_cpus=0.1, num_workers=3, cpus_per_worker=2.0, gpus_per_worker=1.0)
    assert max_concurrent_trials(three_gpu, nodes)[0] == 5                     # workers spill across nodes
    quarter = TrialResources(driver_cpus=0.1, num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.25)
    assert max_concurrent_trials(quarter, nodes)[0] == 64                      # 4 trials per GPU
    assert max_concurrent_trials(quarter, nodes, requested=10)[0] == 10
    n, note = max_concurrent_trials(four_gpu, nodes, requested=10)
    assert n == 4 and "lowered to 4" in note
    assert max_concurrent_trials(quarter, nodes, num_trials=6)[0] == 6


def test_worker_larger_than_every_node():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    with pytest.raises(ResourceError, match="no node can hold even one worker"):
        max_concurrent_trials(TrialResources(0.1, 1, 1.0, gpus_per_worker=2.0), nodes)
    with pytest.raises(ResourceError, match="has 16 CPU, 0 GPU"):
        max_concurrent_trials(TrialResources(0.1, 1, 1.0, gpus_per_worker=1.0), [{"CPU": 16.0, "GPU": 0.0}])


def test_node_resources_reads_live_nodes():
    nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0, "memory": 1e9}},
             {"Alive": False, "Resources": {"CPU": 64.0}},
             {"Alive": True, "Resources": {"CPU": 2.0}}]
    assert node_resources(nodes) == [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.0}]
