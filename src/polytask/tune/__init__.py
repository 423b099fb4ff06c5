"""``polytask tune``: search methods, architectures and hyper-parameters with Optuna.

- ``space``: the YAML search space over dotted configuration fields (``load_space``);
- ``objectives``: validation Δm% (maximised) or every task's validation metric (Pareto), and
  the non-dominated filter;
- ``study``: the study in its storage (SQLite by default, any SQLAlchemy URL), one run folder
  per trial, resumable (``TuneSettings``, ``run_study``);
- ``parallel``: ``--jobs`` worker processes against one storage;
- ``output``: the trials table, the Pareto front plot, importances, the best configuration.

Example::

    from polytask.config import load_config, config_to_dict
    from polytask.tune import TuneSettings, load_space, run_study, write_outputs

    config = load_config("configs/mmoe-synthetic.yaml")
    space = load_space("space.yaml", config_to_dict(config))
    result = run_study(TuneSettings(config, space, trials=40))
    write_outputs(result)
"""

from polytask.tune.objectives import Objective, dominates, pareto_front
from polytask.tune.output import TuneOutputs, front_trials, trial_rows, write_outputs
from polytask.tune.space import SearchSpace, load_space, parse_space
from polytask.tune.study import StudyResult, TuneSettings, run_study

__all__ = [
    "Objective",
    "SearchSpace",
    "StudyResult",
    "TuneOutputs",
    "TuneSettings",
    "dominates",
    "front_trials",
    "load_space",
    "pareto_front",
    "parse_space",
    "run_study",
    "trial_rows",
    "write_outputs",
]
