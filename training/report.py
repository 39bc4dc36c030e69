"""The paper's Tables 4-6 from a set of runs (mean and standard deviation over seeds), as Markdown
and CSV, and the plots: training loss and R@1 per epoch, and Recall@k per loss."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from .engine import DISPLAY_NAMES
from .evaluation import columns

# The paper's row order: baselines first, then the MPA family.
ORDER = ("soft_triple", "proxy_anchor", "proxy_nca", "mpa", "mpa_dw", "mpa_ap")


def summarise(results: list[dict], cols: list[str]) -> list[dict]:
    """One row per loss: the best-epoch metrics' mean and std (ddof=1) over seeds."""
    by_loss = defaultdict(list)
    for r in results:
        by_loss[r["loss"]].append(r)
    rows = []
    for loss in sorted(by_loss, key=ORDER.index):
        runs = by_loss[loss]
        row = {"loss": loss, "method": DISPLAY_NAMES[loss], "seeds": len(runs)}
        for col in cols:
            values = np.array([r["best"][col] for r in runs])
            row[col] = float(values.mean())
            row[col + " std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return rows


def markdown(rows: list[dict], cols: list[str], title: str, by: str | None = None) -> str:
    """Cells read ``mean (std)`` like the paper's; the best mean of each column in bold. With
    ``by`` (a swept config key) each row is one (method, value), the value in a second column, and
    the bold marks each method's best value, the reading a sweep asks for."""
    group = (lambda r: r["method"]) if by else (lambda r: None)
    best, size = {}, defaultdict(int)
    for r in rows:
        size[group(r)] += 1
        for c in cols:
            best[group(r), c] = max(best.get((group(r), c), -np.inf), r[c])
    lead = ["Methods"] + ([by] if by else [])
    lines = [f"### {title}", "", "| " + " | ".join(lead + cols) + " |",
             "|---|" + "---|" * (len(lead) - 1 + len(cols))]
    for r in rows:
        cells = [r["method"]] + ([str(r[by])] if by else [])
        for c in cols:
            text = f"{r[c]:.1f}"
            if not np.isnan(r[c + " std"]):
                text += f" ({r[c + ' std']:.1f})"
            cells.append(f"**{text}**" if r[c] == best[group(r), c] and size[group(r)] > 1
                         else text)
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seeds"] for r in rows})
    lines += ["", f"Best epoch by {cols[0]} per run; mean (standard deviation) over "
              f"{'/'.join(map(str, seeds))} seed(s)."]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict], cols: list[str],
              lead: tuple[str, ...] = ("method", "seeds")) -> None:
    """The table as CSV: the ``lead`` fields, then each column's mean and std."""
    with open(path, "w", newline="") as fh:
        fields = list(lead) + [k for c in cols for k in (c, c + " std")]
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write(out: Path, results: list[dict], recall_ks: list[int], ndcg_ks: list[int],
          title: str) -> str:
    """Write report.md, report.csv and the plots into ``out``; returns the Markdown table."""
    cols = columns(recall_ks, ndcg_ks)
    rows = summarise(results, cols)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, cols, title)
    (out / "report.md").write_text(table)
    write_csv(out / "report.csv", rows, cols)
    _plots(out, results, recall_ks)
    return table


def _plots(out: Path, results: list[dict], recall_ks: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_loss = defaultdict(list)
    for r in results:
        by_loss[r["loss"]].append(r)
    losses = sorted(by_loss, key=ORDER.index)
    first = f"R@{recall_ks[0]}"

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for loss in losses:
        epochs = min(len(r["history"]) for r in by_loss[loss])
        x = np.arange(1, epochs + 1)
        for ax, key in zip(axes, ("train_loss", first)):
            curves = np.array([[h[key] for h in r["history"][:epochs]] for r in by_loss[loss]])
            ax.plot(x, curves.mean(0), label=DISPLAY_NAMES[loss])
            if len(curves) > 1:
                ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="training loss", title="Training loss")
    axes[1].set(xlabel="epoch", ylabel=first, title=f"Test {first}")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss in losses:
        means = [np.mean([r["best"][f"R@{k}"] for r in by_loss[loss]]) for k in recall_ks]
        ax.plot(recall_ks, means, marker="o", label=DISPLAY_NAMES[loss])
    ax.set_xscale("log", base=2)
    ax.set_xticks(recall_ks, [str(k) for k in recall_ks])
    ax.set(xlabel="k", ylabel="Recall@k", title="Recall@k (best epoch, mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall_at_k.png", dpi=120)
    plt.close(fig)
