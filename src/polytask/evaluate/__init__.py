"""Evaluation: per-task metrics of a split, ranking metrics of binary tasks (AUC, GAUC,
log-loss), the multi-task gain Δm% and comparison tables; every model output comes from the one
inference loop, ``inference``.

Modules: ``inference`` (the loop), ``metrics`` (``evaluate`` and the early-stopping monitor),
``ranking`` (``ranking_report``), ``compare`` (Δm%, summaries over seeds, Markdown tables).
"""

from __future__ import annotations

from polytask.evaluate.compare import (
    comparison_markdown,
    delta_m,
    mean_std,
    relative_gains,
    summarize_groups,
)
from polytask.evaluate.inference import decoded_predictions, inference
from polytask.evaluate.metrics import (
    TaskMetrics,
    evaluate,
    monitor_higher_is_better,
    monitor_problem,
    monitor_value,
)
from polytask.evaluate.ranking import auc, gauc, group_codes, log_loss, ranking_report

__all__ = [
    "TaskMetrics",
    "auc",
    "comparison_markdown",
    "decoded_predictions",
    "delta_m",
    "evaluate",
    "gauc",
    "group_codes",
    "inference",
    "log_loss",
    "mean_std",
    "monitor_higher_is_better",
    "monitor_problem",
    "monitor_value",
    "ranking_report",
    "relative_gains",
    "summarize_groups",
]
