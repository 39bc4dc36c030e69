"""A backend ÷ the three-GEMM floor, forward + backward, with the two calls alternating in one
process, per loss, at a few shapes and thread counts: the ratio the CPU backend is held to.

    python -m benchmarks.floor_ratio --shapes cpu-target --threads 1,2 --out benchmarks/results

The sweep (``python -m benchmarks``) measures the floor once per shape and each loss's providers
after one another, so on a machine whose speed drifts (a shared one, turbo, other tenants) a
loss's ratio to the floor also carries the drift between the two measurements. Here every call
of the backend is followed by one of the floor, on the same inputs and fresh gradients, and the
ratio of the medians (and of the minima) is reported with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from .providers import LOSSES, Case, _backend_provider, _floor_build
from .runner import environment, results_stem
from .shapes import SHAPES


def _time(run) -> float:
    run.reset()
    start = time.perf_counter()
    run.forward_backward()
    return time.perf_counter() - start


def measure(loss: str, shape_name: str, backend: str, repeats: int) -> dict:
    case = Case.make(loss, SHAPES[shape_name], torch.float32, torch.device("cpu"))
    ours, floor = _backend_provider(backend).build(case), _floor_build(case)
    for run in (ours, floor):  # warm-up: first calls build, allocate, fault in pages
        _time(run)
    times = {"backend": [], "floor": []}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        times["backend"].append(_time(ours))
        times["floor"].append(_time(floor))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return dict(loss=loss, shape=shape_name, backend=backend, threads=torch.get_num_threads(),
                repeats=repeats, backend_median_s=med["backend"], floor_median_s=med["floor"],
                ratio=med["backend"] / med["floor"], backend_min_s=low["backend"],
                floor_min_s=low["floor"], min_ratio=low["backend"] / low["floor"],
                load_before=load_before, load_after=os.getloadavg()[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="cpu-target")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default="benchmark-results")
    args = parser.parse_args(argv)
    rows, threads_before = [], torch.get_num_threads()
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for shape_name in args.shapes.split(","):
                for loss in args.losses.split(","):
                    row = measure(loss, shape_name, args.backend, args.repeats)
                    rows.append(row)
                    print(f"{threads}t {loss:12s} {shape_name:10s} {args.backend} "
                          f"{row['backend_median_s'] * 1e3:8.1f} ms  floor "
                          f"{row['floor_median_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.3f}  "
                          f"of the minima {row['min_ratio']:.3f}", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    env = environment(torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{results_stem(env, 'floor-ratio')}.json"
    path.write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
