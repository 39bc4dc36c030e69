"""A backend ÷ the three-GEMM floor, forward + backward, with the two calls alternating in one
process, per loss, at a few shapes and thread counts: the ratio the CPU backend is held to.

    python -m benchmarks.floor_ratio --shapes cpu-target --threads 1,2 --out benchmarks/results

The sweep (``python -m benchmarks``) measures the floor once per shape and each loss's providers
after one another, so on a machine whose speed drifts (a shared one, turbo, other tenants) a
loss's ratio to the floor also carries the drift between the two measurements. Here every call
of the backend is followed by one of the floor, on the same inputs and fresh gradients, and the
ratio of the medians (and of the minima) is reported with the load average before and after.

The floor's outputs are fresh tensors, as autograd's are, and the first write of fresh memory
faults its pages in (a sixth of the floor at N=180, C=11,318, K=10 here). Each round also times
the same GEMMs into outputs allocated beforehand, the GEMMs alone: the backend's ratio to that
(``ratio_preallocated``) leaves out what it saves by keeping its gradient buffers mapped between
calls.

``--chunk-budgets 18,19,20`` times the ``"torch"`` backend at each of those chunk budgets (2^b
elements of s per chunk, ``torch_chunked.DEFAULT_CHUNK_ELEMENTS``) in the same alternation, one
floor call per round, a row per budget: how the default was chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from mpa_kernels.backends import torch_chunked

from .providers import LOSSES, Case, _backend_provider, _floor_build
from .runner import environment, results_stem
from .shapes import SHAPES


def _time(run) -> float:
    run.reset()
    start = time.perf_counter()
    run.forward_backward()
    return time.perf_counter() - start


def measure(loss: str, shape_name: str, backend: str, repeats: int,
            budgets: tuple[int | None, ...] = (None,)) -> list[dict]:
    """Rows of backend / floor, one per chunk budget (log2; None: the default as it stands)."""
    case = Case.make(loss, SHAPES[shape_name], torch.float32, torch.device("cpu"))
    ours, floor = _backend_provider(backend).build(case), _floor_build(case)
    floor_warm = _floor_build(case, preallocated=True)
    default = torch_chunked.DEFAULT_CHUNK_ELEMENTS
    elements = {b: default if b is None else 1 << b for b in budgets}
    times = {b: [] for b in budgets}
    floor_times = []

    def with_budget(b, run):
        torch_chunked.DEFAULT_CHUNK_ELEMENTS = elements[b]
        try:
            return _time(run)
        finally:
            torch_chunked.DEFAULT_CHUNK_ELEMENTS = default

    for b in budgets:  # warm-up: first calls build, allocate, fault in pages
        with_budget(b, ours)
    _time(floor)
    _time(floor_warm)
    warm_times = []
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for b in budgets:
            times[b].append(with_budget(b, ours))
        floor_times.append(_time(floor))
        warm_times.append(_time(floor_warm))
    floor_med, floor_low = statistics.median(floor_times), min(floor_times)
    warm_med = statistics.median(warm_times)
    rows = []
    for b, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        rows.append(dict(loss=loss, shape=shape_name, backend=backend,
                         threads=torch.get_num_threads(), repeats=repeats,
                         chunk_elements=elements[b],
                         backend_median_s=med, floor_median_s=floor_med,
                         ratio=med / floor_med, backend_min_s=low, floor_min_s=floor_low,
                         min_ratio=low / floor_low, floor_preallocated_median_s=warm_med,
                         ratio_preallocated=med / warm_med, load_before=load_before,
                         load_after=os.getloadavg()[0]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="cpu-target")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--chunk-budgets", default=None,
                        help="comma-separated log2 chunk budgets of the torch backend to compare")
    parser.add_argument("--out", default="benchmark-results")
    args = parser.parse_args(argv)
    budgets = (None,)
    if args.chunk_budgets:
        if args.backend != "torch":
            parser.error("--chunk-budgets is a setting of the torch backend")
        budgets = tuple(int(b) for b in args.chunk_budgets.split(","))
    rows, threads_before = [], torch.get_num_threads()
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for shape_name in args.shapes.split(","):
                for loss in args.losses.split(","):
                    for row in measure(loss, shape_name, args.backend, args.repeats, budgets):
                        rows.append(row)
                        budget = (f" 2^{row['chunk_elements'].bit_length() - 1}"
                                  if args.chunk_budgets else "")
                        print(f"{threads}t {loss:12s} {shape_name:10s} {args.backend}{budget} "
                              f"{row['backend_median_s'] * 1e3:8.1f} ms  floor "
                              f"{row['floor_median_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.3f}  "
                              f"of the minima {row['min_ratio']:.3f}  to the GEMMs alone "
                              f"{row['ratio_preallocated']:.3f}", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    env = environment(torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "chunk-budgets" if args.chunk_budgets else "floor-ratio"
    path = out / f"{results_stem(env, kind)}.json"
    path.write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
