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
        out.append("| provider | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd / ref | fwd+bwd / floor "
                   "| peak / ref |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["status"] != "ok":
                out.append(f"| {r['provider']} | {r['status']}: {r.get('reason', '')} ||||||")
                continue
            out.append(
                f"| {r['provider']} | {_ms(r, 'forward')} | {_ms(r, 'forward_backward')} | "
                f"{_num(r['peak_forward_backward_bytes'] / 2**20)} | "
                f"{_ratio(r, 'forward_backward_vs_reference')} | "
                f"{_ratio(r, 'forward_backward_vs_floor')} | "
                f"{_ratio(r, 'peak_forward_backward_vs_reference')} |")
        out.append("")
    return "\n".join(out)
