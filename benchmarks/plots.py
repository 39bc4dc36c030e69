"""PNG charts of a results document: one figure per loss and dtype, one column per shape; the top
row is time (forward and forward + backward, median bars with min-max whiskers, and the roofline
prediction as a black tick where the results have one), the bottom row peak memory, one bar per
provider."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Fixed colours, so that a provider looks the same in every chart.
_COLOURS = {
    "reference": "#7f7f7f", "compile": "#1f77b4", "pml": "#9467bd", "torch": "#2ca02c",
    "triton": "#d62728", "triton-linear": "#ff7f0e", "floor": "#8c564b",
}


def _label(r: dict) -> str:
    """What stands in for the bar of a provider that did not run."""
    if r["status"] != "skipped":
        return r["status"]
    if "MemAvailable" in r.get("reason", ""):
        return f"skipped: needs\n~{r['estimated_bytes'] / 2**30:.0f} GiB"
    return f"skipped: est.\n{r['estimated_call_s']:.0f} s per call"


def _whisker(ax, x: float, figure: dict, width: float) -> None:
    """Min-max of the repeats around the median, in ms: how far a single call strayed."""
    med, lo, hi = (figure[k] * 1e3 for k in ("median_s", "min_s", "max_s"))
    ax.errorbar(x, med, yerr=[[med - lo], [hi - med]], fmt="none", ecolor="black",
                elinewidth=0.8, capsize=width * 4)


def _panel(ax, rows: list[dict], value, ylabel: str, secondary=None) -> None:
    """Bars of ``value(r)``; with ``secondary`` (the time panel) a narrower bar inside each, the
    min-max whiskers of both and the predicted forward+backward time as a tick."""
    names = [r["provider"] for r in rows]
    xs = range(len(rows))

    def height(r):
        if not secondary:
            return value(r)
        return max(value(r), secondary(r), r["forward_backward"]["max_s"] * 1e3)

    top = max((height(r) for r in rows if r["status"] == "ok"), default=1.0)
    for x, r in zip(xs, rows):
        colour = _COLOURS.get(r["provider"], "#17becf")
        if r["status"] != "ok":
            ax.text(x, top / 2, _label(r), ha="center", va="center", fontsize=7, rotation=90,
                    color="#b00000")
            continue
        v = value(r)
        ax.bar(x, v, color=colour, alpha=0.45 if secondary else 1.0, width=0.8)
        if secondary:
            ax.bar(x, secondary(r), color=colour, width=0.5)
            _whisker(ax, x + 0.2, r["forward_backward"], 0.8)
            _whisker(ax, x - 0.1, r["forward"], 0.5)
            p = r.get("predicted")
            if p is not None:
                ax.hlines(p["forward_backward_s"] * 1e3, x - 0.4, x + 0.4, colors="black",
                          linewidth=1.5)
        ratio = r.get("forward_backward_vs_reference" if secondary else
                      "peak_forward_backward_vs_reference")
        if ratio is not None and r["provider"] != "reference":
            ax.text(x, height(r), f"{ratio:.2g}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    # Linear: bar lengths on a log axis start at an arbitrary floor and mislead about ratios.
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)


def render(doc: dict, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>-<loss>-<dtype>.png`` for each loss and dtype in ``doc``; return the paths."""
    results = doc["results"]
    env = doc["environment"]
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    paths = []
    for loss in dict.fromkeys(r["loss"] for r in results):
        for dtype in dict.fromkeys(r["dtype"] for r in results):
            fig, axes = plt.subplots(2, len(shapes), figsize=(3.2 * len(shapes) + 0.6, 6.4),
                                     squeeze=False)
            for col, shape in enumerate(shapes):
                rows = [r for r in results
                        if r["loss"] == loss and r["dtype"] == dtype and r["shape"] == shape]
                if not rows:
                    axes[0, col].set_visible(False)
                    axes[1, col].set_visible(False)
                    continue
                r0 = rows[0]
                axes[0, col].set_title(
                    f"{shape}: N={r0['n']} C={r0['c']} K={r0['k']} d={r0['d']}", fontsize=9)
                _panel(axes[0, col], rows, lambda r: r["forward_backward"]["median_s"] * 1e3,
                       "median time, ms" if col == 0 else "",
                       secondary=lambda r: r["forward"]["median_s"] * 1e3)
                _panel(axes[1, col], rows, lambda r: max(r["peak_forward_backward_bytes"], 1)
                       / 2**20, "peak memory above inputs, MiB" if col == 0 else "")
            fig.suptitle(textwrap.fill(
                f"{loss}, {dtype} on {env['device_name']} ({env['torch_threads']} threads), "
                f"torch {env['torch']}. Time: wide light bar forward+backward, narrow dark bar "
                f"forward (medians; whiskers min-max of the repeats; black tick: predicted "
                f"forward+backward). Memory: peak of forward+backward. Labels: forward+backward "
                f"ratio to the reference.", width=int(28 * len(shapes) + 20)), fontsize=9)
            fig.tight_layout()
            path = out_dir / f"{stem}-{loss}-{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
