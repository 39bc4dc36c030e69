"""``--sweep KEY=V1,V2,...``: one experiment repeated over the values of one config key.

Every grid point is an ordinary experiment (all its losses and seeds, run by
:func:`training.cli.run_experiment`) with ``KEY`` overridden, in
``<out_dir>/<name>/sweep-<KEY>/<KEY>=<value>/``. A finished point leaves ``point.json`` (its config
and results); ``--resume auto`` skips every point whose ``point.json`` matches its config and
continues the others run by run from their ``last.pt``, as single runs resume. At the end
``<out_dir>/<name>/sweep-<KEY>.md``, ``.csv``, ``.json`` and ``.png`` hold the table (best epoch,
mean (std) over seeds per value and loss) and the plot of R@1 and every nDCG@k against the value.

This is the paper's Section 4.4 (the number of proxies K) as one command, for any key:
``python -m training --config cub --sweep proxies_per_class=1,4,8,12,16``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import config, report
from .config import ConfigError
from .engine import DISPLAY_NAMES, make_loss
from .evaluation import columns

# Keys that shape the sweep itself (its folders, its lines and error bars, its table's columns)
# rather than a run.
NOT_SWEEPABLE = ("suite", "experiments", "name", "out_dir", "resume", "losses", "seed", "seeds",
                 "recall_ks", "ndcg_ks")
# Keys that change how a run is watched, not what it computes: a point finished with another
# setting of these is still finished.
_NOT_COMPARED = ("resume", "progress")


@dataclass(frozen=True)
class Point:
    label: str  # the value as written in folder names, tables and plots
    value: object
    cfg: dict


def parse(spec: list[str], configs: list[dict]) -> tuple[str, list[list[Point]]]:
    """The key of ``--sweep KEY=V1,V2,...`` and, per experiment, its grid points, every point
    checked (types, ranges, the losses' own arguments) before anything trains."""
    if len(spec) != 1:
        raise ConfigError(f"--sweep takes one KEY=V1,V2,... (got {len(spec)}); a sweep varies "
                          "one key")
    if "=" not in spec[0]:
        raise ConfigError(f"--sweep expects KEY=V1,V2,..., got {spec[0]!r}")
    key, text = (s.strip() for s in spec[0].split("=", 1))
    head = key.split(".")[0]
    if head not in config.SCHEMA:
        raise ConfigError(f"--sweep: unknown config key {key!r}; known keys: "
                          f"{sorted(config.SCHEMA)}")
    if head in NOT_SWEEPABLE:
        raise ConfigError(f"--sweep: {key!r} cannot be swept (it names the sweep's folders, lines, "
                          f"seeds or columns; set it with --{head.replace('_', '-')})")
    texts = _value_texts(key, text)
    grids = []
    for base in configs:
        if base["resume"] not in ("", "auto"):
            raise ConfigError("--sweep resumes with --resume auto; a checkpoint path names a "
                              "single run")
        out = Path(base["out_dir"]) / base["name"] / f"sweep-{key}"
        grid, seen = [], {}
        for item in texts:
            cfg = copy.deepcopy(base)
            try:
                config.apply_override(cfg, f"{key}={item}")
                config.validate(cfg)
                for loss in cfg["losses"]:
                    make_loss(cfg, loss, num_classes=2)
            except (ValueError, TypeError) as err:  # ConfigError is a ValueError
                raise ConfigError(f"--sweep {key}={item}: {err}") from None
            value = _get(cfg, key)
            label = _label(value)
            if label in seen:
                raise ConfigError(f"--sweep {key}: the value {item!r} repeats {seen[label]!r}")
            seen[label] = item
            cfg["name"], cfg["out_dir"] = f"{key}={label}", str(out)
            grid.append(Point(label, value, cfg))
        grids.append(grid)
    return key, grids


def _value_texts(key: str, text: str) -> list[str]:
    """``1,2,4`` or a JSON list, which values holding commas need (``loss_args=[{...}, {...}]``)."""
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--sweep {key}: cannot parse {text!r} as a JSON list ({err})") \
                from None
        texts = [v if isinstance(v, str) else json.dumps(v) for v in values]
    else:
        texts = [t.strip() for t in text.split(",")]
    if not texts or any(t == "" for t in texts):
        raise ConfigError(f"--sweep {key}: expected comma-separated values, got {text!r}")
    return texts


def _get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _label(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text.replace("/", "_").replace(os.sep, "_")


def _comparable(cfg: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in _NOT_COMPARED}))


class _Progress:
    """A tqdm bar over the grid on a terminal; plain lines (one per point) in logs and pipes."""

    def __init__(self, key: str, total: int, enabled: bool):
        self.key, self.total, self.done, self.start = key, total, 0, time.perf_counter()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"sweep {key}", unit="point", dynamic_ncols=True)

    def step(self, label: str, note: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.key}={label} {note}")
            self.bar.update()
            return
        elapsed = time.perf_counter() - self.start
        left = f", about {elapsed / self.done * (self.total - self.done):.0f} s left" \
            if self.done < self.total else ""
        print(f"[sweep {self.key}] {self.done}/{self.total} {self.key}={label}: {note} "
              f"({elapsed:.0f} s elapsed{left})", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(key: str, grid: list[Point], ctx, run_experiment: Callable) -> list[dict] | None:
    """Every point of one experiment's grid (skipping finished ones on ``--resume auto``), then
    the sweep's table, plot and JSON; returns the table's rows on the main rank."""
    base = grid[0].cfg
    out = Path(base["out_dir"])
    runs = len(base["losses"]) * base["seeds"]
    if ctx.is_main:
        print(f"[sweep {key}] {out.parent.name}: {len(grid)} values × {len(base['losses'])} "
              f"losses × {base['seeds']} seeds = {len(grid) * runs} runs", flush=True)
    progress = _Progress(key, len(grid), base["progress"] and ctx.is_main)
    start, points = time.perf_counter(), []
    try:
        for point in grid:
            record_path = out / point.cfg["name"] / "point.json"
            record = _finished(record_path, point.cfg)
            if record is None:
                t0 = time.perf_counter()
                # Per-epoch bars only on a terminal: in a log they are carriage-return noise.
                cfg = dict(point.cfg, progress=point.cfg["progress"] and sys.stdout.isatty())
                results = run_experiment(cfg, ctx)
                record = {"key": key, "value": point.value, "config": point.cfg,
                          "seconds": time.perf_counter() - t0, "results": results}
                if ctx.is_main:  # atomic: a kill leaves the old state or the new, never half
                    tmp = record_path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(record, indent=1))
                    os.replace(tmp, record_path)
                note = f"done in {record['seconds']:.0f} s"
            else:
                note = "already done, skipped"
            points.append(record)
            if ctx.is_main:
                progress.step(point.label, note)
    finally:
        progress.close()
    if not ctx.is_main:
        return None
    return write(out.parent, key, grid, points, time.perf_counter() - start)


def _finished(path: Path, cfg: dict) -> dict | None:
    """The record of a point finished with this config under ``--resume auto``, else None."""
    if cfg["resume"] != "auto" or not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("config") and \
        _comparable(record["config"]) == _comparable(cfg) else None


def write(out: Path, key: str, grid: list[Point], points: list[dict], wall: float) -> list[dict]:
    """``sweep-<key>.md``/``.csv``/``.json``/``.png`` in ``out``; prints the table."""
    cfg = grid[0].cfg
    cols = columns(cfg["recall_ks"], cfg["ndcg_ks"])
    rows = []
    for point, record in zip(grid, points):
        for row in report.summarise(record["results"], cols):
            rows.append(dict(row, **{key: point.label}))
    rows.sort(key=lambda r: report.ORDER.index(r["loss"]))  # stable: values keep grid order
    stem = out / f"sweep-{key}"
    title = f"{out.name} ({cfg['dataset']}, {cfg['backbone']}): {key} swept"
    table = report.markdown(rows, cols, title, by=key)
    stem.with_suffix(".md").write_text(table)
    report.write_csv(stem.with_suffix(".csv"), rows, cols, lead=("method", key, "seeds"))
    # Each point's seconds are those of the call that finished it (a resumed point's earlier
    # calls are not known), so over a resumed sweep this is a lower bound.
    trained = sum(p["seconds"] for p in points)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    summary = {"key": key, "values": [p.value for p in grid], "losses": cfg["losses"],
               "seeds": cfg["seeds"], "training_seconds": trained, "this_call_seconds": wall,
               "load_average_at_end": load,
               "runs": [{"value": p.value, "loss": r["loss"], "seed": r["seed"],
                         "best": r["best"], "seconds": r["seconds"]}
                        for p, record in zip(grid, points) for r in record["results"]]}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(stem.with_suffix(".png"), key, grid, points, cfg)
    print("\n" + table)
    loads = f"; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}" if load else ""
    print(f"sweep: {stem}.md, .csv, .json, .png; {trained:.0f} s of training over all calls, "
          f"{wall:.0f} s this call{loads}\n", flush=True)
    return rows


def plot(path: Path, key: str, grid: list[Point], points: list[dict], cfg: dict) -> None:
    """R@1 and each nDCG@k against the swept value, a line per loss, error bars one std over
    seeds (as the paper's Figures 2-3 and Tables 7-8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [f"R@{cfg['recall_ks'][0]}"] + [f"nDCG@{k}" for k in cfg["ndcg_ks"]]
    numeric = all(isinstance(p.value, (int, float)) and not isinstance(p.value, bool)
                  for p in grid)
    x = [p.value for p in grid] if numeric else list(range(len(grid)))
    log2 = numeric and min(x) > 0 and max(x) / min(x) >= 8
    losses = sorted({r["loss"] for rec in points for r in rec["results"]},
                    key=report.ORDER.index)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for loss in losses:
            values = [np.array([r["best"][metric] for r in rec["results"] if r["loss"] == loss])
                      for rec in points]
            std = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(x, [v.mean() for v in values], yerr=std, marker="o", capsize=3,
                        label=DISPLAY_NAMES[loss])
        if log2:
            ax.set_xscale("log", base=2)
        ax.set_xticks(x, [p.label for p in grid])
        ax.minorticks_off()
        ax.set(xlabel=key, ylabel=metric, title=metric)
    axes[0][0].legend()
    seeds = cfg["seeds"]
    fig.suptitle(f"{path.parent.name}: best epoch, mean ± std over {seeds} seed"
                 f"{'s' if seeds > 1 else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
