"""Evaluation: datasets, approaches (``base``, ``long-context``, ``rlm``), a resumable runner,
scoring, reports and generated tasks. See ``docs/evaluation.md``.

The runner and loaders are library code (no printing); ``rlmflow eval`` is the application.
"""

from .approaches import Approach, DirectApproach, Outcome, RLMApproach, model_window
from .generate import KINDS, GeneratedTask, GenerationError, generate_task, verify_task, write_tasks
from .items import DatasetError, EvalItem
from .loaders import ItemFilter, load_dataset, load_jsonl, load_longbench_json, load_longbench_markdown
from .report import Summary, format_markdown, summarise, write_charts
from .runner import EvalProgress, ItemResult, read_results, run_eval
from .scoring import extract_choice, extract_value, is_refusal, score

__all__ = [
    "KINDS",
    "Approach",
    "DatasetError",
    "DirectApproach",
    "EvalItem",
    "EvalProgress",
    "GeneratedTask",
    "GenerationError",
    "ItemFilter",
    "ItemResult",
    "Outcome",
    "RLMApproach",
    "Summary",
    "extract_choice",
    "extract_value",
    "format_markdown",
    "generate_task",
    "is_refusal",
    "load_dataset",
    "load_jsonl",
    "load_longbench_json",
    "load_longbench_markdown",
    "model_window",
    "read_results",
    "run_eval",
    "score",
    "summarise",
    "verify_task",
    "write_charts",
    "write_tasks",
]
