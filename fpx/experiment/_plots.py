"""Plots of a run directory (matplotlib, Agg): curves, solver steps, sweep.

- `curves.png`: the training loss and every headline metric of the task (`eval/*` such as
  the FNO's zero-shot error included) over training; a loss / MSE / relative-L2 spanning
  more than two decades is drawn on a log axis.
- `solver_steps.png`: forward / backward solver steps and the converged fraction; a member
  without such a solve (an MLP, a JFB or unrolled adjoint's backward pass) is left out
  rather than drawn as a flat 0.
- `sweep.png`: the final headline metric against a swept numeric key (a learning rate, a
  width), mean ± sd over seeds; with only categorical keys (variants) one point per group.
  Seeds are replicates, never an axis.

More than 10 curves get colour × line-style combinations (a colormap beyond 40).
"""

from __future__ import annotations

import math
import pathlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ._report import is_replicate_key

_LINESTYLES = ("-", "--", ":", "-.")
_LOG_NAMES = ("loss", "mse", "l2", "residual", "gap")


def _short(path: str) -> str:
    parts = path.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _styles(n: int) -> list[dict[str, Any]]:
    """`n` distinguishable line styles: tab10 up to 10, tab10 × 4 dash patterns up to 40,
    then a colormap (still cycling the dashes)."""
    if n <= 10:
        return [{"color": f"C{i}", "linestyle": "-"} for i in range(n)]
    if n <= 40:
        return [{"color": plt.get_cmap("tab10")(i % 10), "linestyle": _LINESTYLES[i // 10]} for i in range(n)]
    cmap = plt.get_cmap("viridis")
    return [{"color": cmap(i / (n - 1)), "linestyle": _LINESTYLES[i % 4]} for i in range(n)]


def _labeller(all_hparams: list[dict]):
    """Label members by the variant and the keys that vary (not those a variant fixes).

    A key a member does not have is left out of its label (never `key=None`)."""
    keys = sorted({k for h in all_hparams for k in h})
    varying = [k for k in keys if len({repr(h.get(k)) for h in all_hparams}) > 1]
    if "variant" in keys:
        by_variant: dict = defaultdict(set)
        for h in all_hparams:
            for k in varying:
                by_variant[(h.get("variant"), k)].add(repr(h.get(k)))
        varying = ["variant"] + [
            k for k in varying if k != "variant" and any(len(v) > 1 for (var, kk), v in by_variant.items() if kk == k)
        ]

    def label(hparams: dict) -> str:
        parts = []
        for k in varying:
            if k not in hparams:
                continue
            v = hparams[k]
            if k in ("variant", "run"):
                parts.append(str(v))
            else:
                parts.append(f"{_short(k)}={v:g}" if isinstance(v, float) else f"{_short(k)}={v}")
        return ", ".join(parts)

    return label


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _nothing_to_draw(name: str, values: list[Any]) -> bool:
    # A step count that is always 0 means no such solve ran for this member (JFB, unrolled, MLP).
    numbers = [v for v in values if _is_number(v)]
    return not numbers or (name.endswith("_steps") and all(v == 0 for v in numbers))


def _wants_log(name: str, values: list[float]) -> bool:
    """Errors and losses spanning more than two decades read better on a log axis."""
    positive = [v for v in values if _is_number(v) and math.isfinite(v)]
    return (any(s in name.rsplit("/", 1)[-1] for s in _LOG_NAMES) and bool(positive) and min(positive) > 0
            and max(positive) / min(positive) > 100)


def _same_series(records: list[dict], a: str, b: str) -> bool:
    both = [r for r in records if a in r and b in r]
    return bool(both) and len(both) == sum(b in r for r in records) and all(r[a] == r[b] for r in both)


def plot_records(records: list[dict], out: pathlib.Path, *, headline: Sequence[str] = ()) -> list[pathlib.Path]:
    """Write the training curves (the loss and the `headline` metrics), solver steps over
    training and, for sweeps, the sweep plot from `metrics.jsonl` records into `out`.

    ```python
    import pathlib, tempfile
    from fpx.experiment._plots import plot_records
    records = [{"run": "demo", "member": m, "step": s, "hparams": {"optim.lr": lr, "seed": 0},
                "train/loss": 1 / s, "eval/test_rel_l2": 0.1 / s}
               for m, lr in enumerate([1e-3, 1e-2]) for s in (10, 20)]
    paths = plot_records(records, pathlib.Path(tempfile.mkdtemp()), headline=("eval/test_rel_l2",))
    assert [p.name for p in paths] == ["curves.png", "sweep.png"]
    ```
    """
    out.mkdir(parents=True, exist_ok=True)
    series: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        series[(r.get("run", ""), r["member"])].append(r)
    if not series:
        return []
    for rs in series.values():
        rs.sort(key=lambda r: r["step"])
    several_runs = len({run for run, _ in series}) > 1

    def hparams(key) -> dict:
        h = dict(series[key][0]["hparams"])
        return {"run": key[0], **h} if several_runs else h

    written = []
    keys = sorted({k for r in records for k in r if k.startswith(("train/", "eval/"))})
    _label = _labeller([hparams(k) for k in series])
    styles = dict(zip(sorted(series), _styles(len(series))))

    def curves(names, filename, title):
        chosen: list[str] = []
        for n in dict.fromkeys(names):  # a metric equal to one already drawn (FNO: eval/loss is test_rel_l2) once
            if n in keys and not any(_same_series(records, c, n) for c in chosen):
                chosen.append(n)
        panels = [(n, {k: rs for k, rs in sorted(series.items()) if not _nothing_to_draw(n, [r.get(n) for r in rs])}) for n in chosen]
        panels = [(n, drawn) for n, drawn in panels if drawn]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
        legend: dict[str, Any] = {}
        for ax, (name, drawn) in zip(axes[0], panels):
            for key, rs in drawn.items():
                pts = [(r["step"], r[name]) for r in rs if _is_number(r.get(name))]
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=_label(hparams(key)) or "run", **styles[key])
                legend.setdefault(line.get_label(), line)
            left_out = len(series) - len(drawn)
            if left_out:
                ax.text(0.99, 0.01, f"{left_out} member{'s' * (left_out > 1)} without it not drawn", transform=ax.transAxes,
                        ha="right", va="bottom", fontsize=6, color="0.4")
            if _wants_log(name, [r.get(name) for rs in drawn.values() for r in rs]):
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(name)
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        if len(legend) > 1:
            fig.legend(list(legend.values()), list(legend), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
                       ncol=1 + len(legend) // 25)
        path = out / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    curves(["train/loss", *headline, "eval/loss", "eval/accuracy"], "curves.png", "training curves")
    curves(["train/forward_steps", "train/backward_steps", "eval/converged_fraction"], "solver_steps.png", "fixed-point solver over training")

    metric = next((m for m in (*headline, "eval/accuracy", "eval/loss", "train/loss") if m in keys), keys[-1] if keys else None)
    final = {k: rs[-1] for k, rs in series.items()}
    if metric and len(final) > 1:
        path = _sweep_plot({k: hparams(k) for k in final}, {k: r.get(metric) for k, r in final.items()}, metric, out / "sweep.png")
        if path is not None:
            written.append(path)
    return written


def _mean_sd(values: list[Any]) -> tuple[float, float]:
    xs = [float(v) for v in values if _is_number(v)]
    if not xs:
        return math.nan, 0.0
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, sd


def _sweep_plot(hps: dict, values: dict, metric: str, path: pathlib.Path) -> pathlib.Path | None:
    """Final `metric` against the swept keys, mean ± sd over replicates (seed-like keys)."""
    all_keys = sorted({k for h in hps.values() for k in h})
    replicates = [k for k in all_keys if is_replicate_key(k) and len({repr(h.get(k)) for h in hps.values()}) > 1]
    varying = [k for k in all_keys if not is_replicate_key(k) and len({repr(h.get(k)) for h in hps.values()}) > 1]
    if not varying:
        return None  # only seeds differ: the aggregated table says it, one point would not
    numeric = [k for k in varying if k != "variant" and all(_is_number(h.get(k)) for h in hps.values())]
    over = f" (mean ± sd over {', '.join(replicates)})" if replicates else ""
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    if len(numeric) == 2 and len(varying) == 2:
        xk, yk = numeric
        xs = sorted({h[xk] for h in hps.values()})
        ys = sorted({h[yk] for h in hps.values()})
        cells: dict[tuple, list] = defaultdict(list)
        for key, h in hps.items():
            cells[(ys.index(h[yk]), xs.index(h[xk]))].append(values[key])
        grid = [[_mean_sd(cells.get((j, i), []))[0] for i in range(len(xs))] for j in range(len(ys))]
        im = ax.imshow(grid, origin="lower", aspect="auto")
        ax.set_xticks(range(len(xs)), [_tick(x) for x in xs])
        ax.set_yticks(range(len(ys)), [_tick(y) for y in ys])
        ax.set_xlabel(xk)
        ax.set_ylabel(yk)
        fig.colorbar(im, ax=ax, label=metric)
    elif numeric:
        # A continuous hyperparameter (a learning rate) makes the better axis than an integer one.
        xk = next((k for k in numeric if any(isinstance(h[k], float) for h in hps.values())), numeric[0])
        rest = {key: {k: v for k, v in h.items() if k != xk and not is_replicate_key(k)} for key, h in hps.items()}
        label = _labeller(list(rest.values()))
        groups: dict[str, dict[Any, list]] = defaultdict(lambda: defaultdict(list))
        for key, h in hps.items():
            groups[label(rest[key])][h[xk]].append(values[key])
        for (name, pts), style in zip(sorted(groups.items()), _styles(len(groups))):
            xs = sorted(pts)
            stats = [_mean_sd(pts[x]) for x in xs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats] if replicates else None,
                        marker="o", capsize=3, label=name or None, **style)
        xs = sorted({h[xk] for h in hps.values()})
        if all(isinstance(x, int) for x in xs):
            # Integer keys (a width, a number of iterations) get their own values as ticks.
            if xs[0] > 0 and xs[-1] / xs[0] >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
        elif xs[0] > 0:
            ax.set_xscale("log")
        ax.set_xlabel(xk)
        ax.set_ylabel(metric)
        if any(groups):
            ax.legend(fontsize=7, ncol=1 + len(groups) // 12)
    else:
        # Only categorical keys (variants, solver names): one point per group.
        label = _labeller([{k: v for k, v in h.items() if not is_replicate_key(k)} for h in hps.values()])
        groups: dict[str, list] = defaultdict(list)
        for key, h in hps.items():
            groups[label({k: v for k, v in h.items() if not is_replicate_key(k)})].append(values[key])
        names = list(groups)
        stats = [_mean_sd(groups[n]) for n in names]
        ax.errorbar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats] if replicates else None,
                    fmt="o", capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(metric)
    if _wants_log(metric, list(values.values())):
        ax.set_yscale("log")
    ax.set_title(f"sweep: final {metric}{over}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _tick(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def plot_run(workdir: str | pathlib.Path) -> list[pathlib.Path]:
    """The plots of one run directory, into `workdir/plots` (its task's headline metrics from config.json)."""
    from ._rundir import read_json, read_jsonl
    from ._task import task_headline

    workdir = pathlib.Path(workdir)
    headline = task_headline(str(read_json(workdir / "config.json").get("experiment", "")))
    records = read_jsonl(workdir / "metrics.jsonl", tolerate_partial_tail=True)
    return plot_records(records, workdir / "plots", headline=headline)
