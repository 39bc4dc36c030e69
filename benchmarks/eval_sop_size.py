"""Time and peak memory of ``mpa_kernels.metrics.evaluate`` at the size of SOP's test set.

Synthetic data shaped like Stanford Online Products' test split: 60,502 embeddings of size 512 in
11,316 classes of 2 to 12 images (mean about 5.35, as SOP's), each embedding its class centre plus
Gaussian noise, so that the metrics land in a realistic range.

Memory is measured as resident set size (RSS) above a baseline taken after the embeddings and labels
exist: a thread reads ``/proc/self/statm`` every millisecond while ``evaluate`` runs and keeps the
largest value. RSS is what the process really holds, whatever allocated it (torch's CPU allocator
hands large blocks straight to and back from the kernel, so they show up and vanish in RSS), which
is why neither ``tracemalloc`` (blind to torch) nor ``ru_maxrss`` (the whole life's high-water mark,
including building the data) would do. A spike shorter than the sampling period could be missed; the
similarity block lives for the whole matrix product and top-k of a block, far longer than 1 ms.
On a CUDA device it also reports ``torch.cuda.max_memory_allocated`` above the inputs.

For scale it then times the floor of any exact search, the similarity matrix product alone, in
blocks of 1,024 queries (``--chunk-size`` if given), and prints ``evaluate``'s time as a multiple of
it. Wall and CPU (process) time are both printed: on a shared machine the CPU time is the steadier.

    python benchmarks/eval_sop_size.py [--device cuda] [--chunk-size N] [--ks 1 10 100]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import threading
import time

import torch

from mpa_kernels.metrics import evaluate

NUM_IMAGES = 60_502
NUM_CLASSES = 11_316
MIN_SIZE, MAX_SIZE = 2, 12
EMBEDDING_SIZE = 512
PAGE = os.sysconf("SC_PAGE_SIZE")


def class_sizes(generator: torch.Generator) -> torch.Tensor:
    """NUM_CLASSES sizes in [MIN_SIZE, MAX_SIZE] summing to NUM_IMAGES, binomially spread."""
    spread = MAX_SIZE - MIN_SIZE
    p = (NUM_IMAGES / NUM_CLASSES - MIN_SIZE) / spread
    counts = torch.full((NUM_CLASSES,), float(spread))
    probabilities = torch.full_like(counts, p)
    sizes = MIN_SIZE + torch.binomial(counts, probabilities, generator=generator).long()
    while (gap := NUM_IMAGES - int(sizes.sum())) != 0:
        step = 1 if gap > 0 else -1
        room = ((sizes < MAX_SIZE) if step > 0 else (sizes > MIN_SIZE)).nonzero().squeeze(1)
        pick = room[torch.randperm(room.numel(), generator=generator)[: abs(gap)]]
        sizes[pick] += step
    return sizes


def synthetic_sop(noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(NUM_CLASSES), class_sizes(generator))
    labels = labels[torch.randperm(NUM_IMAGES, generator=generator)]
    centres = torch.nn.functional.normalize(
        torch.randn(NUM_CLASSES, EMBEDDING_SIZE, generator=generator), dim=1
    )
    embeddings = torch.randn(NUM_IMAGES, EMBEDDING_SIZE, generator=generator)
    embeddings.mul_(noise / EMBEDDING_SIZE**0.5).add_(centres[labels])
    return embeddings, labels


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Largest RSS seen by a sampling thread between ``__enter__`` and ``__exit__``."""

    def __init__(self, period_s: float = 0.001):
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period_s)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def timed(fn, device: torch.device):
    """``fn()``, its wall time and the CPU time of this process (all threads), in seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def gemm_floor(embeddings: torch.Tensor, rows: int) -> None:
    """The similarity products of an exact search, block by block, and nothing else."""
    searched = torch.nn.functional.normalize(embeddings.float(), dim=1)
    for block in searched.split(rows):
        block @ searched.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--ndcg-ks", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--noise", type=float, default=2.2, help="noise norm / centre norm")
    args = parser.parse_args()
    device = torch.device(args.device)

    embeddings, labels = synthetic_sop(args.noise)
    embeddings, labels = embeddings.to(device), labels.to(device)
    input_bytes = embeddings.numel() * embeddings.element_size()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base = rss_bytes()
    with PeakRSS() as peak:
        result, wall, cpu = timed(
            lambda: evaluate(
                embeddings, labels, ks=args.ks, ndcg_ks=args.ndcg_ks, chunk_size=args.chunk_size
            ),
            device,
        )

    mib = 2**20
    print(
        f"SOP-size evaluate: N={NUM_IMAGES} d={EMBEDDING_SIZE} classes={NUM_CLASSES} "
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()} load={os.getloadavg()[0]:.1f}"
    )
    print(f"embeddings: {input_bytes / mib:.0f} MiB; baseline RSS {base / mib:.0f} MiB")
    print(f"evaluate: wall {wall:.1f} s, CPU {cpu:.1f} s")
    print(f"peak RSS above the embeddings: {(peak.peak - base) / mib:.0f} MiB (sampled every 1 ms)")
    if device.type == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated() - cuda_base
        print(f"peak CUDA memory above the embeddings: {cuda_peak / mib:.0f} MiB")
    for name, value in result.items():
        print(f"  {name}: {value:.2f}" if isinstance(value, float) else f"  {name}: {value}")

    _, floor_wall, floor_cpu = timed(
        lambda: gemm_floor(embeddings, args.chunk_size or 1024), device
    )
    print(
        f"floor (the blocked similarity products alone): wall {floor_wall:.1f} s, CPU "
        f"{floor_cpu:.1f} s; evaluate / floor = {wall / floor_wall:.2f} (wall), "
        f"{cpu / floor_cpu:.2f} (CPU)"
    )


if __name__ == "__main__":
    main()
