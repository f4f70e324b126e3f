"""Plots of a run directory (matplotlib, Agg): curves, solver steps, sweep."""

from __future__ import annotations

import pathlib
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _short(path: str) -> str:
    parts = path.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _labeller(all_hparams: list[dict]):
    """Label members by the variant and the keys that vary (not those a variant fixes)."""
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
            v = hparams.get(k)
            if k == "variant":
                parts.append(str(v))
            else:
                parts.append(f"{_short(k)}={v:g}" if isinstance(v, float) else f"{_short(k)}={v}")
        return ", ".join(parts) or "run"

    return label


def plot_records(records: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    """Write loss/accuracy curves, solver steps over training and (for sweeps) the sweep plot."""
    out.mkdir(parents=True, exist_ok=True)
    series: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        series[r["member"]].append(r)
    if not series:
        return []
    written = []
    keys = sorted({k for r in records for k in r if k.startswith(("train/", "eval/"))})
    _label = _labeller([rs[0]["hparams"] for rs in series.values()])

    def curves(names, filename, title):
        names = [n for n in names if n in keys]
        if not names:
            return
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
        for ax, name in zip(axes[0], names):
            for member, rs in sorted(series.items()):
                rs = sorted(rs, key=lambda r: r["step"])
                ax.plot([r["step"] for r in rs], [r.get(name) for r in rs], label=_label(rs[0]["hparams"]))
            ax.set_xlabel("step")
            ax.set_title(name)
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.suptitle(title)
        fig.tight_layout()
        if len(labels) > 1:
            fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        path = out / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    curves(["train/loss", "eval/loss", "eval/accuracy"], "curves.png", "training curves")
    curves(["train/forward_steps", "train/backward_steps", "eval/converged_fraction"], "solver_steps.png", "fixed-point solver over training")

    final = {m: max(rs, key=lambda r: r["step"]) for m, rs in series.items()}
    swept = sorted({k for r in final.values() for k in r["hparams"]})
    metric = "eval/accuracy" if "eval/accuracy" in keys else (keys[-1] if keys else None)
    if swept and metric and len(final) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        numeric = [k for k in swept if all(isinstance(r["hparams"].get(k), (int, float)) for r in final.values())]
        if len(numeric) == 2:
            xs = sorted({r["hparams"][numeric[0]] for r in final.values()})
            ys = sorted({r["hparams"][numeric[1]] for r in final.values()})
            grid = [[float("nan")] * len(xs) for _ in ys]
            for r in final.values():
                grid[ys.index(r["hparams"][numeric[1]])][xs.index(r["hparams"][numeric[0]])] = r.get(metric)
            im = ax.imshow(grid, origin="lower", aspect="auto")
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            ax.set_xlabel(numeric[0])
            ax.set_ylabel(numeric[1])
            fig.colorbar(im, ax=ax, label=metric)
        else:
            key = numeric[0] if numeric else swept[0]
            groups: dict[str, list] = defaultdict(list)
            for r in final.values():
                rest = {k: v for k, v in r["hparams"].items() if k != key}
                groups[_label(rest)].append((r["hparams"][key], r.get(metric)))
            for label, pts in groups.items():
                pts.sort(key=lambda p: p[0])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            if numeric and all(p > 0 for pts in groups.values() for p, _ in pts):
                ax.set_xscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
            ax.legend(fontsize=7)
        ax.set_title(f"sweep: final {metric}")
        fig.tight_layout()
        path = out / "sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_run(workdir: pathlib.Path) -> list[pathlib.Path]:
    from ._runner import read_metrics

    return plot_records(read_metrics(workdir), pathlib.Path(workdir) / "plots")
