"""Config-driven experiments: validated configs, vmapped sweeps, run directories, reports."""

from ._config import ConfigError as ConfigError, apply_overrides as apply_overrides, load_config as load_config
from ._registry import ADJOINTS as ADJOINTS, OPTIMIZERS as OPTIMIZERS, SOLVERS as SOLVERS, build as build
from ._report import REPORT_COLUMNS as REPORT_COLUMNS, report as report
from ._runner import (
    TASKS as TASKS,
    expand_sweep as expand_sweep,
    read_metrics as read_metrics,
    register_task as register_task,
    resolve_config as resolve_config,
    run as run,
)
from ._task import Task as Task
