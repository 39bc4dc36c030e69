"""The metrics engine against pytorch-metric-learning's ``AccuracyCalculator``, at SOP's test size.

Data: :func:`benchmarks.eval_sop_size.synthetic_sop`, 60,502 embeddings of size 512 in 11,316
classes of 2 to 12 (SOP's test split). Ours: ``mpa_kernels.metrics.evaluate`` with the paper's SOP
protocol (Recall@1/10/100, nDCG@10/100, MAP@R, R-precision, Precision@1). Theirs:
``AccuracyCalculator(k="max_bin_count")`` computing Precision@1, R-precision and MAP@R. Without faiss
(not installed here) its default k-NN cannot run, so it gets pml's own exact torch search,
``CustomKNN(CosineSimilarity(), batch_size=...)``: unbatched, that search would hold the full
60,502^2 similarity matrix (14.6 GB in fp32).

Each side is timed over ``repeats`` calls (the first also gives the resident-set peak) and run once
more under the CPU memory profiler for the peak of torch's allocator (see :mod:`benchmarks.measure`).
"""

from __future__ import annotations

import time

import torch

from . import measure
from .runner import environment

PML_BATCH = 2048
# Noise of the synthetic embeddings: at eval_sop_size.py's 1.2 every metric is 100, which would
# not show a disagreement between the two engines; at this level they land mid-range.
NOISE = 2.0
SOP_KS, SOP_NDCG_KS = (1, 10, 100), (10, 100)


def _providers(device: torch.device):
    from mpa_kernels.metrics import evaluate

    def ours(emb, labels):
        return evaluate(emb, labels, ks=SOP_KS, ndcg_ks=SOP_NDCG_KS)

    def pml(emb, labels):
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN

        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k="max_bin_count", device=device,
            knn_func=CustomKNN(CosineSimilarity(), batch_size=PML_BATCH),
        )
        out = calc.get_accuracy(emb, labels)
        # pml reports fractions; ours are x100 like the paper.
        return {
            "precision@1": 100 * out["precision_at_1"],
            "precision@r": 100 * out["r_precision"],
            "map@r": 100 * out["mean_average_precision_at_r"],
        }

    return {"evaluate": ours, "pml": pml}


def _estimate_bytes(name: str, n: int, d: int) -> int:
    # Either side holds a normalised copy of the embeddings and one block of similarities; pml
    # also casts the embeddings and labels to float and keeps its (N, k) neighbour tables.
    rows = PML_BATCH if name == "pml" else 1024
    return 3 * n * d * 4 + 2 * rows * n * 4 + 64 * n * 8


def run(device: torch.device, repeats: int, noise: float = NOISE, log=print) -> dict:
    from .eval_sop_size import synthetic_sop

    emb, labels = synthetic_sop(noise)
    emb, labels = emb.to(device), labels.to(device)
    n, d = emb.shape
    env = environment(device)
    results = []
    for name, fn in _providers(device).items():
        record = {"provider": name, "n": n, "d": d, "classes": int(labels.unique().numel())}
        need, avail = _estimate_bytes(name, n, d), measure.mem_available()
        if device.type == "cpu" and avail is not None and need > 0.7 * avail:
            record.update(status="skipped", reason=f"estimated need {need / 2**30:.1f} GiB",
                          estimated_bytes=need)
            results.append(record)
            continue
        try:
            times, out = [], None
            for i in range(max(1, repeats)):
                measure.free_memory(device)
                measure.synchronize(device)
                start = time.perf_counter()

                def call():
                    nonlocal out
                    out = fn(emb, labels)
                    measure.synchronize(device)

                if i == 0 and device.type == "cpu":
                    record["peak_rss_bytes"] = measure.peak_rss_bytes(call)
                else:
                    call()
                times.append(time.perf_counter() - start)
            record["time"] = measure.summarize(times)
            record["peak_bytes"] = measure.peak_bytes(lambda: fn(emb, labels), lambda _: None,
                                                      device)[1]
            record["metrics"] = {k: float(v) for k, v in out.items()}
            record["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - recorded, like the loss providers
            record["status"] = "oom" if measure.is_out_of_memory(err) else "error"
            record["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        finally:
            measure.free_memory(device)
        results.append(record)
        log(_progress(record))
    ok = {r["provider"]: r for r in results if r["status"] == "ok"}
    if "evaluate" in ok and "pml" in ok:
        ours, theirs = ok["evaluate"], ok["pml"]
        ours["time_vs_pml"] = ours["time"]["median_s"] / theirs["time"]["median_s"]
        ours["peak_vs_pml"] = ours["peak_bytes"] / max(theirs["peak_bytes"], 1)
        ours["max_abs_diff_to_pml"] = max(
            abs(ours["metrics"][k] - v) for k, v in theirs["metrics"].items())
    return {"environment": env, "benchmark": "metrics", "noise": noise, "pml_batch": PML_BATCH,
            "results": results}


def _progress(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['provider']:9s} {r['status']}: {r.get('reason', '')}"
    rss = r.get("peak_rss_bytes")
    return (f"{r['provider']:9s} {r['time']['median_s']:8.2f} s   torch peak "
            f"{r['peak_bytes'] / 2**20:8.1f} MiB   RSS peak "
            f"{'-' if rss is None else f'{rss / 2**20:.1f} MiB'}   "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items()
                        if k in ("precision@1", "map@r", "precision@r")))
