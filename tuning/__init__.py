"""Ray Tune sweeps over the training run (issue 5).

    spaces.py     search spaces: dotted config keys -> distributions; presets; the YAML form
    spec.py       the sweep file (search, metric, scheduler, resources) and which metrics trials report
    resources.py  how many trials fit on the cluster at once (driver + Ray Train worker group)
    callbacks.py  Train -> Tune reports that always carry the ranked keys; the live trial table
    sweep.py      `cscctrl tune`: the driver function, the Tuner, resume, the MLflow parent run
    analysis.py   trial table, best trial, Pareto front, trade-off plot, best config as a train file
"""
