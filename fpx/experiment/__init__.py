"""Config-driven experiments: validated configs, vmapped sweeps, run directories, reports.

The registries `SOLVERS`, `ADJOINTS`, `OPTIMIZERS` and `TASKS` are read-only views; add an
experiment with `@register_task(name)`. `TASKS` holds the built-in tasks once `load_tasks()`
(or any run / config validation) has imported them.
"""

from ._config import (
    ConfigError as ConfigError,
    apply_overrides as apply_overrides,
    config_module as config_module,
    load_config as load_config,
)
from ._registry import (
    ADJOINTS as ADJOINTS,
    OPTIMIZERS as OPTIMIZERS,
    SOLVERS as SOLVERS,
    TASKS as TASKS,
    build as build,
    load_tasks as load_tasks,
    register_task as register_task,
)
from ._report import (
    REPORT_COLUMNS as REPORT_COLUMNS,
    ReportWarning as ReportWarning,
    collect as collect,
    markdown_table as markdown_table,
    report as report,
)
from ._runner import (
    build_task as build_task,
    expand_sweep as expand_sweep,
    member_config as member_config,
    read_metrics as read_metrics,
    resolve_config as resolve_config,
    restore as restore,
    run as run,
)
from ._rundir import (
    RunDirectoryError as RunDirectoryError,
    RunLock as RunLock,
    read_json as read_json,
    read_jsonl as read_jsonl,
    run_info as run_info,
)
from ._sections import (
    generated_section as generated_section,
    write_generated_section as write_generated_section,
)
from ._tables import (
    by_variant as by_variant,
    figure_main as figure_main,
    format_minutes as format_minutes,
    format_value as format_value,
    mean_sd as mean_sd,
    member_histories as member_histories,
    read_run as read_run,
    script_main as script_main,
    table_main as table_main,
    timing_by_unit as timing_by_unit,
    unit_ms_per_step as unit_ms_per_step,
)
from ._task import Task as Task
