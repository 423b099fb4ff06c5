"""An Optuna study over a search space: each trial is a normal run folder.

``run_study(settings)`` opens (or resumes) the study named ``settings.name`` in its storage (by
default ``study.db``, an SQLite file in the output folder; any SQLAlchemy URL otherwise, e.g.
PostgreSQL for a study shared by several machines, each running ``polytask tune`` against it),
trains the single-task baselines once when the objective is Δm%, runs trials until the study
holds ``settings.trials`` finished ones (complete or pruned; a study that already holds some
continues from there), and writes the outputs (``polytask.tune.output``).

Trial ``n`` trains in ``<output>/<study>/trial-000n/`` (``config.yaml``, ``metrics.jsonl``,
checkpoints, ``results.json``); the trial's ``run_dir`` user attribute points there, next to
its validation and test metrics.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.config import RunConfig, config_to_dict
from polytask.errors import ConfigError
from polytask.evaluate import TaskMetrics, delta_m
from polytask.run import RunFolder, train_baselines, train_run
from polytask.run.data import build_data
from polytask.tasks import TaskSpec
from polytask.train.nonfinite import NonFiniteError
from polytask.train.runlog import read_metrics
from polytask.tune.objectives import OBJECTIVES, Objective, best_record
from polytask.tune.space import SearchSpace

__all__ = [
    "PRUNERS",
    "StudyResult",
    "StudySpec",
    "TrialRunner",
    "TuneSettings",
    "baseline_metrics",
    "run_study",
]

PRUNERS = ("median", "halving", "none")
FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class TuneSettings:
    """What ``polytask tune`` was asked for."""

    config: RunConfig
    space: SearchSpace
    trials: int
    objective: str = "deltam"
    study_name: str | None = None
    storage: str | None = None
    jobs: int = 1
    output_dir: Path | None = None
    pruner: str = "median"
    pruner_startup_trials: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"--objective: {self.objective!r}; choose {' or '.join(OBJECTIVES)}")
        if self.pruner not in PRUNERS:
            problems.append(f"--pruner: {self.pruner!r}; choose one of {', '.join(PRUNERS)}")
        if self.trials < 1:
            problems.append(f"--trials: at least 1; found {self.trials}")
        if self.jobs < 1:
            problems.append(f"--jobs: at least 1; found {self.jobs}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def output(self) -> Path:
        """The study's folder: baselines, trial run folders, the default storage, outputs."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(self.config.output_dir) / f"tune-{self.config.name}"

    @property
    def name(self) -> str:
        return self.study_name or f"{self.config.name}-{self.objective}"

    @property
    def url(self) -> str:
        """The storage's SQLAlchemy URL."""
        return self.storage or f"sqlite:///{(self.output / 'study.db').resolve()}"


@dataclass
class TrialRunner:
    """Optuna's objective function: sample a configuration, train it as a run folder, score it.
    Picklable, so that worker processes (``--jobs``) receive it whole."""

    base: dict[str, Any]
    space: SearchSpace
    objective: Objective
    folder: Path
    prune: bool
    baselines_test: TaskMetrics | None = None

    def config(self, values: Mapping[str, Any], number: int) -> RunConfig:
        """The configuration of trial ``number`` with the sampled ``values``."""
        base = {**self.base, "name": f"trial-{number:04d}", "output_dir": str(self.folder)}
        base["train"] = {**base.get("train", {}), "progress": False}
        base["evaluate"] = {**base.get("evaluate", {}), "baselines": False}
        return self.space.config(base, values, source=f"trial {number} ({_describe(values)})")

    def __call__(self, trial: Any) -> float | list[float]:
        values = self.space.sample(trial)
        config = self.config(values, trial.number)
        run_dir = self.folder / config.name
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        callbacks = [self._pruning(trial)] if self.prune and not self.objective.multi else []
        try:
            result = train_run(config, run_dir=run_dir, callbacks=callbacks, progress=False)
        except NonFiniteError as exc:  # a diverged trial fails; the study goes on
            trial.set_user_attr("error", str(exc))
            raise
        assert result.fit is not None
        val = best_record(result.fit.history, result.fit.best_epoch)["val"]
        trial.set_user_attr("best_epoch", result.fit.best_epoch)
        trial.set_user_attr("val", val)
        trial.set_user_attr("test", result.test)
        if self.baselines_test is not None:  # the trial's folder says its test Δm% too
            result.baselines = self.baselines_test
            result.delta_m = delta_m(result.test, self.baselines_test, result.tasks)
            trial.set_user_attr("test_delta_m", result.delta_m)
            RunFolder(run_dir).write_results(result.to_json())
        scores = self.objective.values(val)
        return scores if self.objective.multi else scores[0]

    def _pruning(self, trial: Any) -> Callable[[dict[str, Any]], None]:
        import optuna

        def report(record: dict[str, Any]) -> None:
            value = self.objective.delta_m(record["val"])
            if math.isfinite(value):
                trial.report(value, record["epoch"])
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", record["epoch"])
                raise optuna.TrialPruned(f"validation Δm% {value:.3f} at epoch {record['epoch']}")

        return report


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


def _with_driver(url: str) -> str:
    """``postgresql://`` names SQLAlchemy's default driver (psycopg 3); where only psycopg2 is
    installed (polytask's ``tune`` extra), use it.

    >>> _with_driver("sqlite:///a.db")
    'sqlite:///a.db'
    """
    import importlib.util

    find = importlib.util.find_spec
    if url.startswith("postgresql://") and find("psycopg") is None and find("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def open_storage(url: str) -> Any:
    """The RDB storage at the SQLAlchemy ``url``, with heartbeats so that a killed process's
    running trial is marked failed after two minutes.

    Processes that meet a new database at the same moment race to create Optuna's tables: the
    loser retries. A database that cannot be opened is a ``ConfigError`` naming the URL."""
    import optuna
    from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, ProgrammingError

    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 120}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    _with_driver(url), engine_kwargs=engine, heartbeat_interval=30, grace_period=120
                )
        except (IntegrityError, ProgrammingError):  # another process created the schema first
            if attempt == 5:
                raise
            time.sleep(0.5 * (attempt + 1))
        except (OperationalError, ArgumentError, ImportError) as exc:
            why = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
            raise ConfigError(f"--storage {url}: cannot open the database ({why})") from None
    raise AssertionError("unreachable")


@dataclass
class StudySpec:
    """Everything a process needs to open the study and run trials (picklable)."""

    url: str
    name: str
    runner: TrialRunner
    total: int
    pruner: str
    pruner_startup_trials: int
    seed: int
    directions: list[str] = field(default_factory=list)

    def storage(self) -> Any:
        """The study's storage (``open_storage``)."""
        return open_storage(self.url)

    def open(self, worker: int = 0, *, create: bool = False) -> Any:
        """The study, created when ``create`` (and absent), with this worker's own sampler seed
        (a resumed study or another worker does not repeat the first samples)."""
        import numpy as np
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = self.storage()
        try:
            done = len(storage.get_all_trials(storage.get_study_id_from_name(self.name)))
        except KeyError:  # a new study
            done = 0
        seed = int(np.random.SeedSequence([self.seed, done, worker]).generate_state(1)[0])
        multi = len(self.directions) > 1
        sampler = (
            optuna.samplers.NSGAIISampler(seed=seed)
            if multi
            else optuna.samplers.TPESampler(seed=seed)
        )
        if not create:
            return optuna.load_study(
                study_name=self.name, storage=storage, sampler=sampler, pruner=self._pruner()
            )
        return optuna.create_study(
            study_name=self.name,
            storage=storage,
            directions=[optuna.study.StudyDirection[d.upper()] for d in self.directions],
            sampler=sampler,
            pruner=self._pruner(),
            load_if_exists=True,
        )

    def _pruner(self) -> Any:
        import optuna

        if self.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.pruner_startup_trials)
        if self.pruner == "halving":
            return optuna.pruners.SuccessiveHalvingPruner()
        return optuna.pruners.NopPruner()

    def optimize(self, study: Any, n_trials: int, callbacks: Sequence[Any] = ()) -> None:
        """Run trials until the study holds ``total`` finished ones (at most ``n_trials`` here)."""
        import optuna

        states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
        stop = optuna.study.MaxTrialsCallback(self.total, states=states)
        study.optimize(
            self.runner, n_trials=n_trials, callbacks=[stop, *callbacks], catch=(NonFiniteError,)
        )


def finished_trials(study: Any) -> int:
    """Complete and pruned trials of ``study``."""
    import optuna

    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
    return len(study.get_trials(deepcopy=False, states=states))


def baseline_metrics(
    config: RunConfig, output: Path, tasks: list[TaskSpec], *, progress: bool
) -> tuple[TaskMetrics, TaskMetrics]:
    """(validation, test) metrics of the single-task baselines, trained once and cached in
    ``output/baselines/<task>/`` (as ``polytask compare`` does); validation at each baseline's
    best epoch."""
    test = train_baselines(config, RunFolder(output), tasks, progress=progress)
    val: TaskMetrics = {}
    for task in tasks:
        folder = RunFolder(output).baseline(task.name)
        record = best_record(read_metrics(folder.path), folder.read_results()["best_epoch"])
        metrics = record["val"].get(task.name, {})
        val[task.name] = {m: math.nan if v is None else float(v) for m, v in metrics.items()}
    return val, test


def study_spec(settings: TuneSettings) -> StudySpec:
    """Train what the objective needs first (the baselines, once) and describe the study."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("polytask tune needs Optuna: pip install 'polytask[tune]'")
    config = settings.config
    output = settings.output
    output.mkdir(parents=True, exist_ok=True)
    open_storage(settings.url)  # a storage that cannot be opened fails before any training
    tasks = build_data(config).tasks
    baselines_val = baselines_test = None
    if settings.objective == "deltam":
        baselines_val, baselines_test = baseline_metrics(
            config, output, tasks, progress=settings.progress
        )
    objective = Objective(settings.objective, tuple(tasks), baselines_val)
    runner = TrialRunner(
        base=config_to_dict(config),
        space=settings.space,
        objective=objective,
        folder=output / settings.name,
        prune=settings.pruner != "none",
        baselines_test=baselines_test,
    )
    return StudySpec(
        url=settings.url,
        name=settings.name,
        runner=runner,
        total=settings.trials,
        pruner=settings.pruner,
        pruner_startup_trials=settings.pruner_startup_trials,
        seed=config.seed,
        directions=objective.directions(),
    )


def check_study(study: Any, settings: TuneSettings, objective: Objective) -> None:
    """Refuse to resume a study created for another objective or tasks (``ConfigError``);
    record them in a new study."""
    recorded = study.user_attrs.get("polytask")
    mine = {"objective": settings.objective, "objectives": objective.labels()}
    if recorded is None:
        study.set_user_attr("polytask", {**mine, "space": settings.space.text})
        return
    if {k: recorded.get(k) for k in mine} != mine:
        raise ConfigError(
            f"--study {settings.name}: the study in {settings.url} optimises "
            f"{recorded.get('objectives')} ({recorded.get('objective')}), not "
            f"{mine['objectives']} ({settings.objective}); give another --study name"
        )


@dataclass
class StudyResult:
    """A study after ``run_study``, with what its trials were run with."""

    study: Any
    runner: TrialRunner
    settings: TuneSettings


def run_study(
    settings: TuneSettings, *, on_trial: Callable[[int], None] | None = None
) -> StudyResult:
    """Open or resume the study and run it to ``settings.trials`` finished trials; ``on_trial``
    is told the number of finished trials as they finish."""
    from polytask.tune.parallel import available_cores, run_in_processes

    spec = study_spec(settings)
    study = spec.open(create=True)
    check_study(study, settings, spec.runner.objective)
    left = settings.trials - finished_trials(study)
    if left <= 0:
        return StudyResult(study, spec.runner, settings)
    spec.runner.folder.mkdir(parents=True, exist_ok=True)
    jobs = min(settings.jobs, available_cores())  # never more processes than cores
    if jobs == 1:
        callbacks = [lambda s, t: on_trial(finished_trials(s))] if on_trial else []
        spec.optimize(study, left, callbacks)
    else:
        run_in_processes(spec, jobs, left, on_poll=on_trial)
    return StudyResult(spec.open(), spec.runner, settings)
