"""A results file as markdown tables, for the README: ``python -m benchmarks table FILE``."""

from __future__ import annotations


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _ms(r: dict, kind: str) -> str:
    return _num(r[kind]["median_s"] * 1e3)


def _ratio(r: dict, key: str) -> str:
    v = r.get(key)
    return "" if v is None else f"{v:.2g}"


def markdown(doc: dict, losses=None, shapes=None) -> str:
    """One table per loss x shape x dtype: median times, peak memory and the ratios."""
    out = []
    groups = dict.fromkeys((r["loss"], r["shape"], r["dtype"]) for r in doc["results"])
    for loss, shape, dtype in groups:
        if (losses and loss not in losses) or (shapes and shape not in shapes):
            continue
        rows = [r for r in doc["results"]
                if (r["loss"], r["shape"], r["dtype"]) == (loss, shape, dtype)]
        r0 = rows[0]
        out.append(f"**{loss}**, `{shape}` (N={r0['n']}, C={r0['c']}, K={r0['k']}, "
                   f"d={r0['d']}), {dtype}\n")
        predicted = any("predicted" in r for r in rows)
        extra = " predicted fwd+bwd ms (bound) | measured / predicted |" if predicted else ""
        out.append("| provider | fwd ms | fwd+bwd ms (min-max) | peak MiB | fwd+bwd / ref "
                   "| fwd+bwd / floor | peak / ref |" + extra)
        out.append("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if predicted else ""))
        for r in rows:
            if r["status"] != "ok":
                cells = 8 if predicted else 6
                out.append(f"| {r['provider']} | {r['status']}: {r.get('reason', '')} "
                           + "|" * cells)
                continue
            fb = r["forward_backward"]
            line = (
                f"| {r['provider']} | {_ms(r, 'forward')} | {_ms(r, 'forward_backward')} "
                f"({_num(fb['min_s'] * 1e3)}-{_num(fb['max_s'] * 1e3)}) | "
                f"{_num(r['peak_forward_backward_bytes'] / 2**20)} | "
                f"{_ratio(r, 'forward_backward_vs_reference')} | "
                f"{_ratio(r, 'forward_backward_vs_floor')} | "
                f"{_ratio(r, 'peak_forward_backward_vs_reference')} |")
            if predicted:
                p = r.get("predicted")
                line += (f" {_num(p['forward_backward_s'] * 1e3)} ({p['bound_forward']}/"
                         f"{p['bound_backward']}) | {_ratio(r, 'forward_backward_vs_predicted')} |"
                         if p else " | |")
            out.append(line)
        out.append("")
    out.extend(off_prediction([r for r in doc["results"]
                               if (not losses or r["loss"] in losses)
                               and (not shapes or r["shape"] in shapes)]))
    return "\n".join(out)


def off_prediction(results: list[dict], factor: float = 1.5) -> list[str]:
    """Lines naming every measurement more than ``factor`` times its predicted time (empty when
    the results carry no predictions)."""
    rows = [r for r in results if r.get("forward_backward_vs_predicted") is not None]
    if not rows:
        return []
    off = sorted((r for r in rows if r["forward_backward_vs_predicted"] > factor),
                 key=lambda r: -r["forward_backward_vs_predicted"])
    out = [f"Off their predicted bound by more than {factor}x (forward+backward): {len(off)} of "
           f"{len(rows)}"]
    for r in off:
        p = r["predicted"]
        out.append(f"- {r['provider']} {r['loss']} {r['shape']} {r['dtype']}: "
                   f"{r['forward_backward']['median_s'] * 1e3:.3g} ms measured, "
                   f"{p['forward_backward_s'] * 1e3:.3g} ms predicted "
                   f"({p['bound_forward']}/{p['bound_backward']}-bound), "
                   f"x{r['forward_backward_vs_predicted']:.2f}")
    return out
