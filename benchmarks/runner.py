"""The sweep: every provider on every loss x shape x dtype, in one process, into one results file."""

from __future__ import annotations

import csv
import datetime as dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import measure
from .providers import (
    DEFAULT_BYTES_PER_SCORE,
    Case,
    Provider,
    all_providers,
    unavailable_reason,
)
from .shapes import Shape
from mpa_kernels.backends import BackendUnavailableError, _native

REPO = Path(__file__).resolve().parent.parent
# A CPU run is skipped when its estimated need passes this share of MemAvailable: the estimate is
# an extrapolation, and the OOM killer takes the whole sweep with it.
MEMORY_SAFETY = 0.7


@dataclass
class Options:
    device: torch.device
    shapes: list[Shape]
    losses: list[str]
    providers: list[str] | None  # None: every provider available
    dtypes: list[torch.dtype]
    repeats: int
    warmup: int
    seconds_per_case: float  # fewer repeats (at least one) when one call is slow
    max_call_seconds: float  # skip a run whose one forward+backward is estimated to take longer
    interpreter: bool
    roofline: str | None = None  # GPU model (benchmarks.roofline.GPUS) to predict each time with
    seed: int = 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Extrapolator:
    """Extrapolates a provider's figure (peak memory, time of one call) to a larger shape from
    what it measured at smaller ones.

    The figure is fitted as ``a + b * scores`` (scores = N*C*K, the entries of s) through the two
    largest shapes measured, so a provider that stores s extrapolates linearly and a chunked one
    whose memory is bounded stays bounded. ``None`` when nothing was measured yet.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple, list[tuple[int, float]]] = {}

    def observe(self, key: tuple, scores: int, value: float) -> None:
        self._seen.setdefault(key, []).append((scores, value))

    def estimate(self, key: tuple, scores: int) -> float | None:
        seen = sorted(self._seen.get(key, []))
        if not seen:
            return None
        if len(seen) == 1 or seen[-1][0] == seen[-2][0]:
            s1, v1 = seen[-1]
            return v1 * max(1.0, scores / s1)
        (s0, v0), (s1, v1) = seen[-2], seen[-1]
        slope = max(0.0, (v1 - v0) / (s1 - s0))
        return max(v1, v1 + slope * (scores - s1))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import pytorch_metric_learning

        pml_version = pytorch_metric_learning.__version__
    except ImportError:
        pml_version = None
    # Uncommitted edits to the measured code make the commit alone an incomplete description.
    dirty = _git("status", "--porcelain", "--", "mpa_kernels", "reference", "benchmarks")
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "pytorch_metric_learning": pml_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_uncommitted": [line.split(maxsplit=1)[1] for line in dirty.splitlines()] if dirty
        else [],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        # PyTorch's CPU allocator backs buffers of 2 MiB and more with huge pages when this is
        # set (Linux): fewer page faults on fresh gradients, which moves CPU timings.
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        # The "torch" backend's chunk loops: native (built C++) or its eager ops, and why.
        "torch_backend_loops": _native.status() if device.type == "cpu" else None,
        "mem_available_bytes": measure.mem_available(),
        # Other processes on the machine slow the measured ones; the load says how busy it was.
        "load_average": list(os.getloadavg()),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_stem(env: dict, tag: str = "") -> str:
    """``<device-name>-<date>[-tag]``, e.g. ``cpu-amd-epyc-2026-11-27``."""
    name = _slug(env["device_name"])
    if env["device"] == "cpu":
        name = "cpu-" + name
    return "-".join(p for p in (name, env["date_utc"][:10], tag) if p)


def _measure(provider: Provider, case: Case, opts: Options, record: dict) -> None:
    """Fill ``record`` with the times and peaks of one provider on one case, and the 1-minute
    load average before and after (other jobs on the machine slow the measured ones)."""
    device = opts.device
    record["load_before"] = os.getloadavg()[0]
    start = time.perf_counter()
    run = provider.build(case)
    # A compiling provider's first call compiles: one more warm-up call, so that the number of
    # repeats is planned on a call that runs the compiled code.
    for i in range(max(1, opts.warmup) + provider.compiles):
        run.reset()
        t0 = time.perf_counter()
        run.forward_backward()
        measure.synchronize(device)
        last = time.perf_counter() - t0
        if i == 0:
            # The first call is where torch.compile compiles (or loads its cache).
            record["first_call_s"] = time.perf_counter() - start
    repeats = max(1, min(opts.repeats, int(opts.seconds_per_case / max(last, 1e-9))))
    record["forward"] = measure.summarize(
        measure.time_calls(run.forward, device, repeats, run.reset))
    record["forward_backward"] = measure.summarize(
        measure.time_calls(run.forward_backward, device, repeats, run.reset))
    run.reset()
    record["peak_forward_bytes"], record["peak_forward_backward_bytes"] = measure.peak_bytes(
        run.forward, run.backward, device)
    run.reset()
    if run.value is not None:
        with torch.no_grad():
            record["loss_value"] = run.value()
    record["load_after"] = os.getloadavg()[0]
    record["status"] = "ok"


def _add_prediction(record: dict, case: Case, gpu: str) -> None:
    """The roofline model's times beside the measured ones, and measured / predicted."""
    from . import roofline

    if record["provider"] not in roofline.PROVIDERS:
        return
    p = roofline.predict(record["provider"], case.loss, case.shape, _dtype_name(case.dtype), gpu,
                         tf32=torch.backends.cuda.matmul.allow_tf32)
    if p is None:
        return
    record["predicted"] = {
        "gpu": p["gpu"],
        **{f"{kind}_s": p[kind]["time_s"] for kind in ("forward", "backward", "forward_backward")},
        "bound_forward": p["forward"]["bound"], "bound_backward": p["backward"]["bound"],
    }
    for kind in ("forward", "forward_backward"):
        if record.get("status") == "ok":
            record[f"{kind}_vs_predicted"] = record[kind]["median_s"] / p[kind]["time_s"]


def _add_ratios(group: list[dict]) -> None:
    """Ratios of each provider's figures to the reference's and the floor's, within one loss x
    shape x dtype."""
    by_name = {r["provider"]: r for r in group if r["status"] == "ok"}
    figures = {
        "forward": lambda r: r["forward"]["median_s"],
        "forward_backward": lambda r: r["forward_backward"]["median_s"],
        "peak_forward_backward": lambda r: r["peak_forward_backward_bytes"],
    }
    for r in group:
        if r["status"] != "ok":
            continue
        for base in ("reference", "floor"):
            b = by_name.get(base)
            for fig, get in figures.items():
                key = f"{fig}_vs_{base}"
                r[key] = get(r) / get(b) if b is not None and get(b) > 0 else None
        ref = by_name.get("reference")
        if "loss_value" in r and ref is not None and "loss_value" in ref:
            r["loss_rel_diff_to_reference"] = abs(r["loss_value"] - ref["loss_value"]) / max(
                abs(ref["loss_value"]), 1e-12)


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:9.1f} MiB"


def _progress(r: dict) -> str:
    head = f"{r['loss']:12s} {r['shape']:10s} {r['dtype']:8s} {r['provider']:14s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    line = (f"{head} fwd {r['forward']['median_s'] * 1e3:9.2f} ms   fwd+bwd "
            f"{r['forward_backward']['median_s'] * 1e3:9.2f} ms   peak "
            f"{_fmt_bytes(r['peak_forward_backward_bytes'])}  (x{r['forward']['repeats']})")
    p = r.get("predicted")
    if p is not None:
        line += (f"   predicted fwd {p['forward_s'] * 1e3:.3g} / fwd+bwd "
                 f"{p['forward_backward_s'] * 1e3:.3g} ms ({p['bound_forward']}/"
                 f"{p['bound_backward']}-bound): x{r['forward_vs_predicted']:.2f} / "
                 f"x{r['forward_backward_vs_predicted']:.2f} of it")
    return line


def select_providers(opts: Options) -> tuple[list[Provider], dict[str, str | None]]:
    """The providers to run, and for every known provider why it does not run (None: it does)."""
    chosen, status = [], {}
    for p in all_providers():
        if opts.providers is not None and p.name not in opts.providers:
            status[p.name] = "not selected"
            continue
        status[p.name] = unavailable_reason(p, opts.device, opts.interpreter)
        if status[p.name] is None:
            chosen.append(p)
    return chosen, status


def sweep(opts: Options, log=print, checkpoint=None) -> dict:
    """Run every selected provider over ``opts`` and return the results document.

    ``checkpoint(doc)``, if given, receives the document so far after each loss x shape x dtype,
    so that a sweep stopped by a time limit still leaves what it measured.
    """
    # Everything alive now (modules, torch's and pml's objects) lives to the end: moved out of the
    # collector's sight, the gc.collect() before each measurement takes milliseconds, not a second.
    gc.collect()
    gc.freeze()
    try:
        return _sweep(opts, log, checkpoint)
    finally:
        gc.unfreeze()


def _sweep(opts: Options, log, checkpoint) -> dict:
    providers, provider_status = select_providers(opts)
    env = environment(opts.device)
    estimators = {"memory": Extrapolator(), "time": Extrapolator()}
    results: list[dict] = []
    floors: dict[tuple, dict] = {}
    log(f"# {env['device_name']}, torch {env['torch']}, {env['torch_threads']} threads; "
        f"providers: {[p.name for p in providers]}")
    # Smallest first, so that the memory estimate of a large shape rests on measured smaller ones.
    for shape in sorted(opts.shapes, key=lambda s: s.scores):
        for dtype in opts.dtypes:
            for loss in opts.losses:
                case = Case.make(loss, shape, dtype, opts.device, opts.seed)
                group = []
                for p in providers:
                    if not p.applies(loss):
                        continue
                    record = {
                        "loss": loss, "shape": shape.name, "n": case.shape.n, "c": case.shape.c,
                        "k": case.shape.k, "d": case.shape.d, "dtype": _dtype_name(dtype),
                        "provider": p.name,
                    }
                    floor_key = (case.shape, dtype)
                    if p.per_shape_only and floor_key in floors:
                        record.update({k: v for k, v in floors[floor_key].items()
                                       if k not in record})
                    else:
                        _run_guarded(p, case, opts, record, estimators)
                        if opts.roofline is not None:
                            try:
                                _add_prediction(record, case, opts.roofline)
                            except Exception as err:  # noqa: BLE001 - keep the measurement
                                record["predicted_error"] = f"{type(err).__name__}: {err}"[:300]
                        if p.per_shape_only:
                            floors[floor_key] = record
                    group.append(record)
                    log(_progress(record))
                _add_ratios(group)
                results.extend(group)
                if checkpoint is not None:
                    checkpoint(_document(opts, env, provider_status, results))
                del case  # before the next case allocates its own inputs
    env["load_average_end"] = list(os.getloadavg())
    return _document(opts, env, provider_status, results)


def _document(opts: Options, env: dict, provider_status: dict, results: list[dict]) -> dict:
    return {
        "environment": env,
        "options": {
            "shapes": [vars(s) for s in opts.shapes],
            "losses": opts.losses,
            "dtypes": [_dtype_name(d) for d in opts.dtypes],
            "repeats": opts.repeats,
            "warmup": opts.warmup,
            "seconds_per_case": opts.seconds_per_case,
            "max_call_seconds": opts.max_call_seconds,
            "roofline": opts.roofline,
            "memory_method": ("torch.cuda.max_memory_allocated" if opts.device.type == "cuda"
                              else "torch.profiler CPU allocator events"),
        },
        "providers": provider_status,
        "results": results,
    }


def _run_guarded(p: Provider, case: Case, opts: Options, record: dict,
                 estimators: dict[str, Extrapolator]) -> None:
    """Measure, or record why not: skipped by the memory or time estimate, out of memory, or an
    error."""
    key = (case.loss if not p.per_shape_only else "", p.name, case.dtype)
    scores = case.shape.scores
    seconds = estimators["time"].estimate(key, scores)
    if seconds is not None:
        record["estimated_call_s"] = seconds
        if seconds > opts.max_call_seconds:
            record["status"] = "skipped"
            record["reason"] = (f"estimated {seconds:.0f} s per forward+backward > "
                                f"--max-call-seconds {opts.max_call_seconds:g}")
            return
    if opts.device.type == "cpu":
        fitted = estimators["memory"].estimate(key, scores)
        if fitted is None:
            fitted = DEFAULT_BYTES_PER_SCORE * max(case.dtype.itemsize, 4) // 4 * scores
        need = int(fitted * 1.25 + p.extra_bytes(case))
        avail = measure.mem_available()
        record["estimated_bytes"] = need
        if avail is not None and need > MEMORY_SAFETY * avail:
            record["status"] = "skipped"
            record["reason"] = (f"estimated need {need / 2**30:.1f} GiB > {MEMORY_SAFETY:.0%} "
                                f"of MemAvailable {avail / 2**30:.1f} GiB")
            return
    try:
        _measure(p, case, opts, record)
    except BackendUnavailableError as err:  # the backend refuses this loss (a kernel limit)
        record["status"] = "unsupported"
        record["reason"] = str(err)
    except Exception as err:  # noqa: BLE001 - a failing provider is a result, not a crash
        record["status"] = "oom" if measure.is_out_of_memory(err) else "error"
        record["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        for k in ("forward", "forward_backward"):
            record.pop(k, None)
    finally:
        measure.free_memory(opts.device)
    if record.get("status") == "ok":
        estimators["memory"].observe(key, scores, record["peak_forward_backward_bytes"])
        estimators["time"].observe(key, scores, record["forward_backward"]["min_s"])


CSV_FIELDS = [
    "loss", "shape", "n", "c", "k", "d", "dtype", "provider", "status",
    "forward_median_s", "forward_min_s", "forward_max_s",
    "forward_backward_median_s", "forward_backward_min_s", "forward_backward_max_s", "repeats",
    "peak_forward_bytes", "peak_forward_backward_bytes",
    "forward_vs_reference", "forward_backward_vs_reference", "peak_forward_backward_vs_reference",
    "forward_vs_floor", "forward_backward_vs_floor", "peak_forward_backward_vs_floor",
    "first_call_s", "loss_value", "loss_rel_diff_to_reference", "estimated_bytes",
    "estimated_call_s", "load_before", "load_after",
    "predicted_forward_s", "predicted_forward_backward_s", "predicted_bound_forward",
    "predicted_bound_backward", "forward_vs_predicted", "forward_backward_vs_predicted", "reason",
]


def _csv_row(r: dict) -> dict:
    row = {k: v for k, v in r.items() if k in CSV_FIELDS}
    for kind in ("forward", "forward_backward"):
        for stat in ("median_s", "min_s", "max_s"):
            if kind in r:
                row[f"{kind}_{stat}"] = r[kind][stat]
        if kind in r:
            row["repeats"] = r[kind]["repeats"]
    for key, value in r.get("predicted", {}).items():
        if f"predicted_{key}" in CSV_FIELDS:
            row[f"predicted_{key}"] = value
    return row


def write_results(doc: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (everything) and ``<stem>.csv`` (one row per result; the environment as
    ``#`` comment lines, which ``pandas.read_csv(comment="#")`` skips)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    with csv_path.open("w", newline="") as f:
        for k, v in doc["environment"].items():
            f.write(f"# {k}: {v}\n")
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in doc["results"]:
            writer.writerow(_csv_row(r))
    return json_path, csv_path
