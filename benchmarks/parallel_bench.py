"""Class-parallel sweep: per-rank memory, step time and bytes communicated with R gloo processes.

``python -m benchmarks.parallel_bench`` runs, for each shape and loss, R in {1, 2, 4} CPU processes
(gloo) that each hold 1/R of the classes, and times one training step of the loss: forward,
backward and an SGD step of the proxies, from leaf embeddings (N/R rows per rank; no backbone).
Per rank it records

* the proxies' and their gradient's bytes (exact, from the tensors) and the AdamW state they would
  carry (two more copies, not allocated here: the step uses SGD to keep the sweep in memory);
* the rise of the resident-set high-water mark during one step (measured; it includes the
  similarity-sized intermediates of the backend, which for the reference path are N x C_r x K);
* the median step time over ``--steps`` steps after one warm-up step;
* every collective's payload, counted by :class:`mpa_kernels.parallel.CommCounter`.

It writes ``<out>.json`` and ``<out>.png`` and prints a table beside the NCCL cost model at R = 8
(:func:`nccl_cost_model`). The machine these numbers come from is named in the JSON; on a shared
CPU the times are noisy and only their ratios between R mean much.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import measure
from .runner import environment
from mpa_kernels.parallel import ClassParallelLoss, CommCounter

# C = 1e6 is the point of the exercise; the control shares its N and d at 1 % of the classes, so
# that equal bytes per step at both show the traffic does not depend on C. The reference path
# stores N x C_r x K similarities, so N stays small at C = 1e6.
SHAPES = {
    "C1M": dict(num_classes=1_000_000, proxies_per_class=2, dim=128, batch=32),
    "C10k-control": dict(num_classes=10_000, proxies_per_class=2, dim=128, batch=32),
    "SOP": dict(num_classes=11_318, proxies_per_class=2, dim=512, batch=256),
}
LOSSES = ("mpa_dw", "mpa")  # one row-wise, one column-wise
WORLD_SIZES = (1, 2, 4)

# NVLink 4 on H100 SXM: 900 GB/s per GPU in both directions together, 450 GB/s each way; nccl-tests
# (doc/PERFORMANCE.md) defines bus bandwidth so that it is comparable with that link speed and
# reports 8 x H100 SXM all-reduce bus bandwidths near it at large sizes.
NVLINK4_BUS_BYTES_PER_S = 450e9
# Per-collective latency of small NCCL messages inside one NVSwitch node: an order-of-magnitude
# assumption (tens of microseconds), not a measurement. The small all-reduces are latency-bound.
NCCL_SMALL_LATENCY_S = 20e-6


def _worker(rank: int, world: int, init_file: str, out: str, shape: dict, loss: str,
            steps: int, backend: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
    try:
        C, K, d, n = (shape[k] for k in ("num_classes", "proxies_per_class", "dim", "batch"))
        torch.manual_seed(0)
        kwargs = {} if loss in ("proxy_anchor", "proxy_nca") else {"proxies_per_class": K}
        loss_fn = ClassParallelLoss(loss, C, d, backend=backend, **kwargs)
        opt = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        x_all = torch.randn(n, d, generator=g)
        # Labels spread over all classes, so that every rank owns some positives.
        y_all = torch.randint(0, C, (n,), generator=g)
        local = slice(rank * n // world, (rank + 1) * n // world)
        x = x_all[local].clone().requires_grad_(True)
        y = y_all[local]

        def step():
            opt.zero_grad(set_to_none=False)
            x.grad = None
            value = loss_fn(x, y)
            value.backward()
            opt.step()
            return value

        step()  # warm-up; allocates the gradient
        if world > 1:
            dist.barrier()
        with CommCounter() as comm:
            peak = measure.peak_rss_bytes(step)
        times = []
        for _ in range(steps):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        p = loss_fn.proxies
        row = {"rank": rank, "class_range": list(loss_fn.class_range),
               "proxy_bytes": p.numel() * p.element_size(),
               "proxy_grad_bytes": p.grad.numel() * p.grad.element_size(),
               "adamw_state_bytes": 2 * p.numel() * p.element_size(),
               "step_peak_rss_bytes": peak, "step_s_median": statistics.median(times),
               "step_s_all": times, "comm_bytes": dict(comm.bytes), "comm_calls": dict(comm.calls),
               "comm_bytes_total": comm.total}
        Path(out, f"rank{rank}.json").write_text(json.dumps(row))
        if world > 1:
            dist.barrier()  # no rank closes its connections while a peer still reads from them
    finally:
        if world > 1:
            dist.destroy_process_group()


def _estimate_bytes(shape: dict, world: int) -> int:
    """Rough need of all ``world`` processes on the reference path (about six proxy-sized
    tensors: proxies, gradient, unit copy, its gradient and the normalisation's backward; ten
    N x C_r x K intermediates; 300 MiB of interpreter and torch each), to skip a point that
    cannot fit rather than run the machine out of memory."""
    C, K, d, n = (shape[k] for k in ("num_classes", "proxies_per_class", "dim", "batch"))
    c_r = -(-C // world)
    return world * (4 * (6 * c_r * K * d) + 10 * 4 * n * c_r * K + 300 * 2**20)


def run_point(shape: dict, loss: str, world: int, steps: int, backend: str) -> dict:
    need, available = _estimate_bytes(shape, world), measure.mem_available()
    if available is not None and need > 0.8 * available:
        return {"status": "skipped", "reason": f"needs ~{need / 2**30:.1f} GiB, MemAvailable "
                f"{available / 2**30:.1f} GiB"}
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, os.path.join(tmp, "init"), tmp, shape, loss, steps, backend)
        if world == 1:
            _worker(0, *args)
        else:
            mp.spawn(_worker, args=args, nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return {"status": "ok", "ranks": ranks}


def nccl_cost_model(shape: dict, loss: str, world: int = 8, emb_bytes: int = 4) -> dict:
    """What one class-parallel step sends over NVLink 4 at ``world`` ranks, and how long that takes
    at :data:`NVLINK4_BUS_BYTES_PER_S` bus bandwidth (ring factors of nccl-tests' bus bandwidth:
    ``(R-1)/R`` of the whole array for all-gather and reduce-scatter, ``2(R-1)/R`` for all-reduce)
    plus :data:`NCCL_SMALL_LATENCY_S` per collective; beside it, the data-parallel path's
    all-reduce of the full proxy gradient. Counts are of the whole (gathered) array, in bytes."""
    C, K, d, n = (shape[k] for k in ("num_classes", "proxies_per_class", "dim", "batch"))
    ring = (world - 1) / world
    ops = [("all_gather row counts", world * 8, ring),
           ("all_gather labels (int64)", n * 8, ring),
           ("all_gather unit embeddings", n * d * emb_bytes, ring),
           ("reduce_scatter embedding gradient (backward)", n * d * emb_bytes, ring)]
    if loss in ("mpa", "proxy_anchor"):
        ops.append(("all_reduce SUM of the partial loss", 4, 2 * ring))
    else:
        ops += [("all_reduce MAX of row maxima", n * 4, 2 * ring),
                ("all_reduce SUM of rescaled row sums", n * 4, 2 * ring),
                ("all_reduce SUM of positive terms + regulariser", (n + 1) * 4, 2 * ring)]
    rows = [{"collective": name, "array_bytes": b, "bus_factor": f,
             "seconds": b * f / NVLINK4_BUS_BYTES_PER_S + NCCL_SMALL_LATENCY_S}
            for name, b, f in ops]
    grad_bytes = C * K * d * 4
    return {
        "world_size": world, "bus_bytes_per_s": NVLINK4_BUS_BYTES_PER_S,
        "latency_s_per_collective": NCCL_SMALL_LATENCY_S, "collectives": rows,
        "class_parallel_seconds": sum(r["seconds"] for r in rows),
        "class_parallel_array_bytes": sum(r["array_bytes"] for r in rows),
        "data_parallel_proxy_grad_allreduce_bytes": grad_bytes,
        "data_parallel_seconds": grad_bytes * 2 * ring / NVLINK4_BUS_BYTES_PER_S
        + NCCL_SMALL_LATENCY_S,
        "per_rank_proxy_and_grad_bytes": {"data_parallel": 2 * grad_bytes,
                                          "class_parallel": 2 * grad_bytes // world},
    }


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(doc["shapes"])
    fig, axes = plt.subplots(3, len(shapes), figsize=(4.2 * len(shapes), 9), squeeze=False)
    for col, shape in enumerate(shapes):
        for loss in doc["losses"]:
            pts = [(p["world_size"], p) for p in doc["points"]
                   if p["shape"] == shape and p["loss"] == loss and p["status"] == "ok"]
            if not pts:
                continue
            rs = [r for r, _ in pts]
            worst = [max(p["ranks"], key=lambda q: q["step_s_median"]) for _, p in pts]
            axes[0][col].plot(rs, [w["step_s_median"] for w in worst], "o-", label=loss)
            axes[1][col].plot(rs, [max(q["proxy_bytes"] + q["proxy_grad_bytes"]
                                       for q in p["ranks"]) / 2**20 for _, p in pts], "o-",
                              label=f"{loss}: proxies + grad")
            axes[1][col].plot(rs, [max(q["step_peak_rss_bytes"] or 0 for q in p["ranks"])
                                   / 2**20 for _, p in pts], "x--",
                              label=f"{loss}: step RSS rise")
            axes[2][col].plot(rs, [max(q["comm_bytes_total"] for q in p["ranks"]) / 2**10
                                   for _, p in pts], "o-", label=loss)
        axes[0][col].set_title(shape + "\n" + ", ".join(f"{k}={v:,}" for k, v in
                                                         doc["shapes"][shape].items()),
                               fontsize=8)
        axes[0][col].set_ylabel("step time, slowest rank (s)")
        axes[1][col].set_ylabel("per-rank MiB")
        axes[2][col].set_ylabel("KiB handed to collectives per rank")
        for row in axes:
            row[col].set_xlabel("ranks R (gloo, CPU)")
            row[col].set_xticks(list(doc["world_sizes"]))
            row[col].legend(fontsize=6)
    fig.suptitle(f"class-parallel step, {doc['environment']['device_name']} "
                 f"(shared, loaded machine), backend {doc['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parallel_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated of " +
                   ", ".join(SHAPES))
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--world-sizes", default=",".join(map(str, WORLD_SIZES)))
    p.add_argument("--steps", type=int, default=3, help="timed steps per point")
    p.add_argument("--backend", default="reference")
    p.add_argument("--out", default=None, help="output path without extension (default: "
                   "benchmarks/results/cpu-<date>-class-parallel)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    losses = args.losses.split(",")
    worlds = [int(w) for w in args.world_sizes.split(",")]
    date = dt.date.today().isoformat()
    out = Path(args.out or Path(__file__).parent / "results" / f"cpu-{date}-class-parallel")
    doc = {"environment": environment(torch.device("cpu")), "backend": args.backend,
           "shapes": shapes, "losses": losses, "world_sizes": worlds, "points": [],
           "nccl_cost_model_R8": {}}
    print(f"{'shape':>13} {'loss':>7} {'R':>2} {'slowest step s':>14} {'proxy+grad MiB':>14} "
          f"{'step RSS rise MiB':>17} {'comm B/rank':>11}")
    for name, shape in shapes.items():
        for loss in losses:
            doc["nccl_cost_model_R8"][f"{name}/{loss}"] = nccl_cost_model(shape, loss)
            for world in worlds:
                point = {"shape": name, "loss": loss, "world_size": world,
                         **run_point(shape, loss, world, args.steps, args.backend)}
                doc["points"].append(point)
                if point["status"] != "ok":
                    print(f"{name:>13} {loss:>7} {world:>2} {point['reason']}")
                    continue
                ranks = point["ranks"]
                params = max(r["proxy_bytes"] + r["proxy_grad_bytes"] for r in ranks)
                print(f"{name:>13} {loss:>7} {world:>2} "
                      f"{max(r['step_s_median'] for r in ranks):14.3f} {params / 2**20:14.1f} "
                      f"{max(r['step_peak_rss_bytes'] or 0 for r in ranks) / 2**20:17.1f} "
                      f"{max(r['comm_bytes_total'] for r in ranks):11,}", flush=True)
    doc["environment"]["load_average_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    plot(doc, out.with_suffix(".png"))
    print("\nNCCL cost model, R = 8, NVLink 4 (H100 SXM), fp32 embeddings:")
    for key, model in doc["nccl_cost_model_R8"].items():
        print(f"  {key}: class-parallel {model['class_parallel_array_bytes']:,} B in "
              f"{len(model['collectives'])} collectives, "
              f"{model['class_parallel_seconds'] * 1e6:.0f} us; data-parallel proxy-gradient all-reduce "
              f"{model['data_parallel_proxy_grad_allreduce_bytes']:,} B, "
              f"{model['data_parallel_seconds'] * 1e3:.2f} ms")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
