"""The application: a validated configuration becomes objects (``build``, ``data``), one run is
built, fitted and tested (``single``), a run folder is read back (``folder``), and experiments
(single-task baselines and Δm%, methods × seeds) call one run (``experiments``).

Example (what ``polytask train`` does)::

    from polytask.config import load_config
    from polytask.run import RunFolder, train_with_baselines

    result = train_with_baselines(load_config("configs/multi-digits.yaml"))
    model = RunFolder(result.run_dir).load_trained().model
"""

from polytask.run.experiments import (
    Comparison,
    compare_methods,
    comparison_table,
    evaluate_with_baselines,
    resume_with_baselines,
    train_baselines,
    train_with_baselines,
    write_comparison,
)
from polytask.run.folder import RunFolder, TrainedModel, load_trained
from polytask.run.single import RunResult, evaluate_run, resume_run, train_run

__all__ = [
    "Comparison",
    "RunFolder",
    "RunResult",
    "TrainedModel",
    "compare_methods",
    "comparison_table",
    "evaluate_run",
    "evaluate_with_baselines",
    "load_trained",
    "resume_run",
    "resume_with_baselines",
    "train_baselines",
    "train_run",
    "train_with_baselines",
    "write_comparison",
]
