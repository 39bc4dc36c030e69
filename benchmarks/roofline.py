"""A roofline model of every loss provider on the GPUs users have (H100 SXM, H200 SXM).

Each provider's forward and backward pass is a list of kernels; each kernel has three costs:

* ``flops``: GEMM work at the tensor-core (or FP32) peak of its dtype,
* ``bytes``: what it reads and writes in HBM (compulsory traffic: each operand once),
* ``mufu``: special-function-unit operations (``exp``, ``log``, reciprocal: ``ex2``, ``lg2``,
  ``rcp``, 16 per SM per clock on sm_90).

A kernel's time is the **max** of the three: inside one kernel the tensor cores, the SFUs and the
memory system work at once, so the slowest unit sets the pace (the roofline; a kernel whose time is
near the sum instead does not overlap them). Kernels launched one after another on a stream add
up, so a pass is the **sum** of its kernels. The host issues every kernel (eager op or Triton
launch) at :data:`HOST_SECONDS_PER_LAUNCH` each, asynchronously ahead of the GPU, so a pass takes
``max(sum of kernel times, launches x HOST_SECONDS_PER_LAUNCH)``; the ``bound`` of a pass says
which term won (``launch``, or the unit of the kernels that take most of its time).

How each provider is costed:

* ``floor``: the three GEMMs at the inputs' dtype (``x w^T`` forward; ``ds w`` and ``ds^T x``
  backward, ``ds`` given), as the benchmark's floor provider runs them.
* ``triton``: the front end (normalisation of x and of the proxies, the proxy regulariser, the
  reduction of the backend's unreduced terms), counted op by op; then cuBLAS's ``s = x w^T``
  (writes s in the input dtype), the loss kernel (reads s, writes its split partials), the merge
  of the partials into the terms, the backward loss kernel (reads s, writes ds) and cuBLAS's
  ``ds w`` and ``ds^T x``.
* ``triton-linear``: the front end; a forward kernel that recomputes nothing and stores no s (one
  GEMM-equivalent), a backward that recomputes s and does both gradient products (three
  GEMM-equivalents; deterministic mode, ``triton-linear-det``: one owner launch per side, four),
  at ``K_PAD / K`` times the work (a class's proxies are padded to a power of two in a tile), and
  the fp32 gradient buffers the host zeroes, sums, scales and casts.
* ``reference`` and ``compile``: the reference is every aten op of its forward and backward,
  counted on the ``meta`` device (no data, any shape) by :class:`OpCounter`: bytes of the tensors
  each op reads and writes, GEMM FLOPs, transcendental elements; each op is one kernel. It computes
  in fp32 whatever the inputs (it upcasts half inputs). ``compile`` is costed as a bound, not an
  estimate: the reference's GEMMs (fp32) with everything between them fused into one read of s
  forward and one read of s and one write of ds backward, and each pass of the front end (as
  counted) one kernel: what inductor could reach at best.
* ``torch`` (the chunked CPU backend, on a GPU): every op counted as for the reference, but on
  CPU tensors (its chunking looks at the data), so only where ``N*C*K`` is at most
  :data:`MAX_COUNTED_SCORES`.

Not in the model: L2 and shared-memory traffic (tiles that re-read x or w from L2, the
read-modify-write of the fused backward's fp32 owned tile every loop step, its ``atomic_add`` of
dx), tile padding of N and C to the block sizes, occupancy and register spills. A kernel far off
its bound is where to look for those.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .providers import _FUNCTIONS, HYPERPARAMETERS, SINGLE_PROXY
from .shapes import Shape
from mpa_kernels import functional

# --------------------------------------------------------------------------------------------
# The GPUs. Peaks are dense (no 2:4 sparsity), at the boost clock the data sheets quote them at.


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    clock_hz: float
    peak_flops: dict  # dtype name -> FLOP/s of a GEMM in that dtype
    hbm_bytes_per_s: float
    mufu_per_sm_per_clock: int
    sources: tuple = field(default=(), compare=False)

    @property
    def mufu_per_s(self) -> float:
        return self.sms * self.clock_hz * self.mufu_per_sm_per_clock

    def gemm_peak(self, dtype: str, tf32: bool = False) -> float:
        if dtype == "float32" and tf32:
            return self.peak_flops["tf32"]
        return self.peak_flops[dtype]


_HOPPER_COMPUTE = dict(
    sms=132,
    # 989.4e12 bf16 dense FLOP/s = 132 SMs x 4 tensor cores x 512 FMA x 2 FLOP x 1.83 GHz: the
    # clock the data sheet's tensor peaks assume; the SFU rate below is taken at the same clock.
    clock_hz=1.83e9,
    peak_flops={
        "bfloat16": 989.4e12,
        "float16": 989.4e12,
        "tf32": 494.7e12,
        "float32": 66.9e12,  # FP32 on the CUDA cores (torch's default: allow_tf32 is False)
    },
    mufu_per_sm_per_clock=16,
)
_SOURCES = (
    "NVIDIA H100 Tensor Core GPU data sheet (H100 SXM column): FP32 67 TFLOPS, TF32 Tensor Core "
    "989 TFLOPS*, BF16/FP16 Tensor Core 1,979 TFLOPS* (*with sparsity: dense is half), "
    "GPU memory bandwidth 3.35 TB/s",
    "NVIDIA H100 Tensor Core GPU Architecture whitepaper (GH100, H100 SXM5): 132 SMs, 4 fourth-"
    "generation tensor cores per SM",
    "CUDA C++ Programming Guide, Arithmetic Instructions throughput table: 16 results per clock "
    "per SM for 32-bit exp2/log2/reciprocal (the special-function unit) on compute capability "
    "9.0; FlashAttention-3 (Shah et al., 2024, sec. 3.1) quotes the same as 3.9 TFLOPS of "
    "special functions on H100 SXM5 against 989 TFLOPS of FP16 matmul",
)
GPUS = {
    "h100": GPU("NVIDIA H100 SXM", hbm_bytes_per_s=3.35e12, sources=_SOURCES,
                **_HOPPER_COMPUTE),
    "h200": GPU("NVIDIA H200 SXM", hbm_bytes_per_s=4.8e12, sources=_SOURCES + (
        "NVIDIA H200 Tensor Core GPU data sheet (H200 SXM): the H100 SXM's compute figures, "
        "141 GB HBM3e at 4.8 TB/s",), **_HOPPER_COMPUTE),
}

# Host time to issue one kernel: an eager aten op's dispatch plus launch, or a Triton launch
# through its Python launcher. An assumption (a few microseconds on a current server CPU), not a
# data-sheet figure: the first GPU run calibrates it.
HOST_SECONDS_PER_LAUNCH = 5e-6
# The torch backend is counted by running it on CPU tensors (seconds at 2^23 scores, on the GPU
# machine too, inside its sweep); beyond this many scores it is left out.
MAX_COUNTED_SCORES = 1 << 23


def gpu_for_device_name(name: str) -> str | None:
    """The model's key for a CUDA device name (``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``)."""
    low = name.lower()
    for key in GPUS:
        if key in low:
            return key
    return None


# --------------------------------------------------------------------------------------------
# Kernels and passes.


@dataclass
class Kernel:
    name: str
    flops: float = 0.0
    bytes: float = 0.0
    mufu: float = 0.0
    dtype: str = "float32"  # the GEMM's dtype (for its peak)

    def times(self, gpu: GPU, tf32: bool = False) -> dict:
        return {
            "compute": self.flops / gpu.gemm_peak(self.dtype, tf32) if self.flops else 0.0,
            "memory": self.bytes / gpu.hbm_bytes_per_s,
            "exp": self.mufu / gpu.mufu_per_s,
        }

    def time(self, gpu: GPU, tf32: bool = False) -> float:
        return max(self.times(gpu, tf32).values())


def pass_time(kernels: list[Kernel], gpu: GPU, tf32: bool = False) -> dict:
    """``{"time_s", "bound", "flops", "bytes", "mufu", "launches", "device_s"}`` of one pass."""
    device = 0.0
    by_unit = {"compute": 0.0, "memory": 0.0, "exp": 0.0}
    for k in kernels:
        times = k.times(gpu, tf32)
        unit = max(times, key=times.get)
        by_unit[unit] += times[unit]
        device += times[unit]
    host = len(kernels) * HOST_SECONDS_PER_LAUNCH
    bound = "launch" if host > device else max(by_unit, key=by_unit.get)
    return {
        "time_s": max(device, host),
        "device_s": device,
        "bound": bound,
        "flops": sum(k.flops for k in kernels),
        "bytes": sum(k.bytes for k in kernels),
        "mufu": sum(k.mufu for k in kernels),
        "launches": len(kernels),
    }


def gemm(name: str, m: int, n: int, k: int, dtype: str, out_bytes: int | None = None) -> Kernel:
    """``(m x k) @ (k x n)`` reading both operands and writing the result once."""
    b = _itemsize(dtype)
    out = b if out_bytes is None else out_bytes
    return Kernel(name, flops=2.0 * m * n * k, bytes=float(b * (m * k + k * n) + out * m * n),
                  dtype=dtype)


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def k_pad(k: int) -> int:
    """Proxies per class padded to a power of two, as both Triton kernel modules tile them."""
    return 1 << max(0, k - 1).bit_length()


# --------------------------------------------------------------------------------------------
# Special-function operations per pair (row, class) and per score of the Triton kernels, read off
# mpa_kernels/kernels (common.py's helpers run over the full K_PAD-wide tile):
#   class_similarity (softmax over K, eq. 1): one exp and one division (rcp) per padded score;
#   online_lse_update: one exp per pair and log-sum-exp (the column-wise family runs two, over
#     positives and negatives, each over the whole tile);
#   softplus: an exp and a log per pair where evaluated on the whole tile (MPA-DW in the kernels
#     over s, forward and backward);
#   backward: the class similarity again, and one exp per pair for dz.
_COLUMN_WISE = frozenset({"mpa", "proxy_anchor"})


def mufu_per_score(loss: str, k: int, kind: str, fused: bool) -> float:
    """SFU operations per real score (entry of s) of one Triton pass, ``kind`` forward/backward."""
    pairs_fwd = 2.0 if loss in _COLUMN_WISE else 1.0
    softplus = 2.0 if (loss == "mpa_dw" and not fused) else 0.0
    per_pair = (pairs_fwd + softplus) if kind == "forward" else (1.0 + softplus)
    return (2.0 * k_pad(k) + per_pair) / k


# --------------------------------------------------------------------------------------------
# Counting aten ops (the reference, the torch backend, the front end).

_TRANSCENDENTAL = {"exp", "exp_", "log", "log_", "log1p", "sigmoid", "softplus", "sqrt", "rsqrt",
                   "reciprocal", "reciprocal_", "_softmax", "_log_softmax", "logsumexp", "pow",
                   "_softmax_backward_data", "sigmoid_backward", "tanh"}
# Ops that allocate or alias without touching data.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
         "lift_fresh", "_local_scalar_dense", "alias", "set_", "resize_", "_to_copy_meta"}
_MATMULS = {"mm", "bmm", "addmm", "baddbmm"}


def _distinct_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of ``tensors``, a storage seen through several views (``w`` and ``w.T``) once."""
    seen: dict[int, int] = {}
    for t in tensors:
        key = t.untyped_storage()._cdata
        seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


class OpCounter(TorchDispatchMode):
    """Records each aten op that moves data as a :class:`Kernel`: bytes of the tensors it reads
    (arguments, less ``out=``) and writes (results), GEMM FLOPs, transcendental results."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[Kernel] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE:
            return out
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:  # a query (promote_types, sizes): no kernel
            return out
        reads = [t for t in tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]
                 if isinstance(t, torch.Tensor)]
        nbytes = _distinct_bytes(reads) + _distinct_bytes(outs)
        flops = 0.0
        dtype = outs[0].dtype
        if name.rstrip("_") in _MATMULS:  # addmm_ and baddbmm_ too
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            flops = 2.0 * a.numel() * b.shape[-1]
        mufu = float(sum(t.numel() for t in outs)) if name in _TRANSCENDENTAL else 0.0
        if name == "logsumexp":
            mufu = float(reads[0].numel())
        self.kernels.append(Kernel(name, flops, float(nbytes), mufu,
                                   str(dtype).removeprefix("torch.")))
        return out


def _kwargs(loss: str, k: int) -> dict:
    kw = dict(HYPERPARAMETERS[loss])
    if loss not in SINGLE_PROXY:
        kw["proxies_per_class"] = k
    return kw


class _NoSimilarity(torch.autograd.Function):
    """Stands in for a backend's similarity term when only the front end is counted: free
    unreduced terms ((2, N) or (2, C), as the GPU backends return them, so that the front end's
    reduction of them is counted), gradients that cost nothing (the backend's own kernels write
    them)."""

    @staticmethod
    def forward(ctx, x_hat, w_hat, owned):
        ctx.shapes = (x_hat, w_hat)
        return x_hat.new_empty((2, owned), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        x_hat, w_hat = ctx.shapes
        return x_hat.new_empty(x_hat.shape), w_hat.new_empty(w_hat.shape), None


def _no_autocast(*args, **kwargs):
    return contextlib.nullcontext()


def count_ops(loss: str, shape: Shape, dtype: str, backend: str,
              device: str = "meta") -> tuple[list[Kernel], list[Kernel]]:
    """The aten ops of ``functional.<loss>(backend=...)`` forward and backward.

    ``backend="front-end"`` runs the front end (normalisation, regulariser, gradient plumbing)
    around a similarity term that costs nothing: what every backend without a ``proxy_loss`` pays
    besides its own kernels. On ``meta`` nothing is computed (any shape, instantly);
    ``torch.autocast`` has no meta device, so the front end's "autocast off" is a no-op here.
    """
    k = 1 if loss in SINGLE_PROXY else shape.k
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    if device == "meta":
        x = torch.empty(shape.n, shape.d, device=device, dtype=dt)
        w = torch.empty(shape.c * k, shape.d, device=device, dtype=dt)
        y = torch.zeros(shape.n, device=device, dtype=torch.long)
    else:
        x = torch.randn(shape.n, shape.d, generator=gen).to(dt)
        w = torch.randn(shape.c * k, shape.d, generator=gen).to(dt)
        y = torch.randint(0, shape.c, (shape.n,), generator=gen)
    x.requires_grad_()
    w.requires_grad_()
    patches = contextlib.ExitStack()
    if device == "meta":
        patches.enter_context(mock.patch.object(torch, "autocast", _no_autocast))
    name = backend
    if backend == "front-end":
        stand_in = SimpleNamespace(LOW_PRECISION=True,
                                   similarity_terms=lambda xh, wh, lab, spec: _NoSimilarity.apply(
                                       xh, wh, spec.num_classes if spec.column_wise
                                       else xh.shape[0]))
        patches.enter_context(mock.patch.object(functional, "resolve",
                                                lambda *a, **kw: stand_in))
        name = "reference"  # any name passes the check; resolve is replaced
    with patches:
        with OpCounter() as fwd:
            value = _FUNCTIONS[loss](x, y, w, backend=name, validate=False, **_kwargs(loss, k))
        with OpCounter() as bwd:
            value.backward()
    return fwd.kernels, bwd.kernels


# --------------------------------------------------------------------------------------------
# Providers.

PROVIDERS = ("reference", "compile", "torch", "triton", "triton-linear", "triton-linear-det",
             "floor")


def _forward_splits(n: int, classes: int, k: int, loss: str) -> tuple[int, int]:
    """(splits, M) of the loss forward over s: its programs own blocks of rows (row-wise) or of
    classes (column-wise) and split the other dimension as kernels.launch.plan_splits does, for
    the 132 SMs both modelled GPUs have; M is N or C, the partials are [2, splits, M] fp32."""
    from mpa_kernels.kernels.similarity import BLOCK_N, TILE_COLUMNS, _column_wise

    row_blocks = -(-n // BLOCK_N)
    class_blocks = -(-classes // max(1, TILE_COLUMNS // k_pad(k)))
    column_wise = _column_wise(loss)
    owned, swept = (class_blocks, row_blocks) if column_wise else (row_blocks, class_blocks)
    splits = max(1, min(swept, -(-4 * GPUS["h100"].sms // owned)))
    per_split = -(-swept // splits)
    return -(-swept // per_split), classes if column_wise else n


def _core_triton(n: int, m: int, d: int, loss: str, k: int, dtype: str):
    """The "triton" backend's own kernels: cuBLAS around the loss kernels over s."""
    b = _itemsize(dtype)
    scores = n * m
    splits, owned = _forward_splits(n, m // k, k, loss)
    fwd = [
        gemm("s = x w^T", n, m, d, dtype),
        Kernel("loss forward (reads s)", bytes=scores * b + 8 * n + 8 * splits * owned,
               mufu=scores * mufu_per_score(loss, k, "forward", fused=False)),
        Kernel("merge split partials", bytes=8 * splits * owned + 8 * owned),
    ]
    bwd = [
        Kernel("loss backward (reads s, writes ds)", bytes=2 * scores * b + 8 * n,
               mufu=scores * mufu_per_score(loss, k, "backward", fused=False)),
        gemm("dx = ds w", n, d, m, dtype),
        gemm("dw = ds^T x", m, d, n, dtype),
    ]
    return fwd, bwd


def _core_linear(n: int, m: int, d: int, loss: str, k: int, dtype: str, deterministic: bool):
    """The "triton-linear" backend's kernels and host epilogue (mpa_kernels/kernels/linear.py).

    GEMM work runs over the padded proxies (m * K_PAD / K columns). Compulsory traffic: x and w
    read once per launch, the fp32 gradient buffers written once by the kernels; the host then
    zeroes the buffers first and scales and casts them into the gradients after.
    """
    b = _itemsize(dtype)
    padded = m * k_pad(k) // k
    gemm_eq = 2.0 * n * padded * d
    scores = n * m
    xw = (n + m) * d * b
    classes = m // k
    fwd = [Kernel("fused forward", flops=gemm_eq, bytes=xw + 16 * max(n, classes),
                  mufu=scores * mufu_per_score(loss, k, "forward", fused=True), dtype=dtype),
           Kernel("merge partials (torch)", bytes=24 * max(n, classes))]
    mufu_bwd = scores * mufu_per_score(loss, k, "backward", fused=True)
    bwd = [Kernel("zero fp32 dw buffer", bytes=4 * m * d)]
    if deterministic:
        bwd += [Kernel("zero fp32 dx buffer", bytes=4 * n * d),
                Kernel("backward, row owners (dx)", flops=2 * gemm_eq,
                       bytes=xw + 4 * n * d, mufu=mufu_bwd, dtype=dtype)]
    else:
        bwd += [Kernel("zero fp32 dx (atomics)", bytes=4 * n * d)]
    bwd += [
        Kernel("backward, class owners (dw" + ("" if deterministic else " + atomic dx") + ")",
               flops=(2 if deterministic else 3) * gemm_eq, bytes=xw + 4 * m * d + 4 * n * d,
               mufu=mufu_bwd, dtype=dtype),
        # (part * unit).to(w.dtype) then the copy into dw; the same for dx.
        Kernel("scale fp32 dw", bytes=8 * m * d), Kernel("cast dw", bytes=(4 + b) * m * d),
        Kernel("copy into dw", bytes=2 * b * m * d),
        Kernel("scale fp32 dx", bytes=8 * n * d), Kernel("cast dx", bytes=(4 + b) * n * d),
    ]
    return fwd, bwd


def _fused(name: str, kernels: list[Kernel]) -> Kernel:
    return Kernel(name, sum(k.flops for k in kernels), sum(k.bytes for k in kernels),
                  sum(k.mufu for k in kernels), "float32")


@functools.lru_cache(maxsize=None)
def _counted(loss: str, shape: Shape, dtype: str, backend: str, device: str):
    return count_ops(loss, shape, dtype, backend, device)


def provider_kernels(provider: str, loss: str, shape: Shape,
                     dtype: str) -> tuple[list[Kernel], list[Kernel]] | None:
    """(forward kernels, backward kernels) of ``provider``; ``None`` where it is not modelled."""
    k = 1 if loss in SINGLE_PROXY else shape.k
    n, m, d = shape.n, shape.c * k, shape.d
    if provider == "floor":
        return [gemm("x w^T", n, m, d, dtype)], [gemm("ds w", n, d, m, dtype),
                                                 gemm("ds^T x", m, d, n, dtype)]
    if provider == "reference":
        return _counted(loss, shape, dtype, "reference", "meta")
    if provider == "torch":
        if n * m > MAX_COUNTED_SCORES:
            return None
        return _counted(loss, shape, dtype, "torch", "cpu")
    if provider == "compile":
        # The reference computes in fp32 whatever the inputs; fusion leaves s and ds in fp32, and
        # at best turns each pass of the front end into one kernel.
        fe_fwd, fe_bwd = _counted(loss, shape, "float32", "front-end", "meta")
        fwd, bwd = _core_triton(n, m, d, loss, k, "float32")
        return ([_fused("front end, fused", fe_fwd)] + fwd,
                [_fused("front end, fused", fe_bwd)] + bwd)
    fe_fwd, fe_bwd = _counted(loss, shape, dtype, "front-end", "meta")
    if provider == "triton":
        fwd, bwd = _core_triton(n, m, d, loss, k, dtype)
    elif provider in ("triton-linear", "triton-linear-det"):
        fwd, bwd = _core_linear(n, m, d, loss, k, dtype, provider == "triton-linear-det")
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    return fe_fwd + fwd, fe_bwd + bwd


def predict(provider: str, loss: str, shape: Shape, dtype: str, gpu: str | GPU,
            tf32: bool = False) -> dict | None:
    """Predicted forward, backward and forward+backward times of ``provider``, with each pass's
    bound and totals; ``None`` where the provider is not modelled at this shape."""
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    kernels = provider_kernels(provider, loss, shape, dtype)
    if kernels is None:
        return None
    fwd, bwd = (pass_time(ks, gpu, tf32) for ks in kernels)
    both = pass_time(kernels[0] + kernels[1], gpu, tf32)
    both["time_s"] = fwd["time_s"] + bwd["time_s"]
    return {"gpu": gpu.name, "forward": fwd, "backward": bwd, "forward_backward": both}


# --------------------------------------------------------------------------------------------
# The "auto" crossover between "triton" and "triton-linear".


def linear_gain_s(shape: Shape, dtype: str, gpu: str, loss: str = "mpa_dw") -> float:
    """Predicted forward+backward time of "triton" minus "triton-linear" (> 0: linear faster),
    the shared front end left out."""
    k = 1 if loss in SINGLE_PROXY else shape.k
    n, m, d = shape.n, shape.c * k, shape.d
    g = GPUS[gpu]
    t = sum(pass_time(p, g)["time_s"] for p in _core_triton(n, m, d, loss, k, dtype))
    lin = sum(pass_time(p, g)["time_s"] for p in _core_linear(n, m, d, loss, k, dtype, False))
    return t - lin


def crossover_batch(c: int, k: int, d: int, dtype: str, gpu: str, loss: str = "mpa_dw",
                    max_n: int = 1 << 20) -> int | None:
    """Smallest batch N (a power of two) from which "triton-linear" is predicted faster than
    "triton" at C, K, d; ``None`` if it never is up to ``max_n``."""
    n = 1
    while n <= max_n:
        if linear_gain_s(Shape("x", n, c, k, d), dtype, gpu, loss) > 0:
            return n
        n *= 2
    return None


def auto_price(gpu: str, dtype: str, loss: str = "mpa_dw", d: int = 512,
               max_bytes: float = 60e9) -> dict:
    """How much ``"auto"``'s size rule costs in time: over a grid of N in {256, 1024, 4096,
    16384}, C in {11318, 100000, 1000000}, K in {1, 2, 4, 8, 10, 16} where s and ds take at
    least ``LINEAR_MIN_SIMILARITY_BYTES`` (and fit a GPU, under ``max_bytes``), the range of
    predicted forward+backward time of "triton-linear" over "triton", front end included."""
    from mpa_kernels.backends import LINEAR_MIN_SIMILARITY_BYTES

    b = _itemsize(dtype)
    ratios = []
    for n in (256, 1024, 4096, 16384):
        for c in (11318, 100000, 1000000):
            for k in (1, 2, 4, 8, 10, 16):
                if not LINEAR_MIN_SIMILARITY_BYTES <= 2 * n * c * k * b <= max_bytes:
                    continue
                shape = Shape("grid", n, c, k, d)
                t = predict("triton", loss, shape, dtype, gpu)["forward_backward"]["time_s"]
                lin = predict("triton-linear", loss, shape, dtype, gpu)
                ratios.append((lin["forward_backward"]["time_s"] / t, n, c, k))
    ratios.sort()
    return {"threshold_bytes": LINEAR_MIN_SIMILARITY_BYTES, "cases": len(ratios),
            "best": ratios[0], "worst": ratios[-1]}


def _ms(v: float) -> str:
    return f"{v * 1e3:.3g}"


def markdown(doc: dict) -> str:
    """The predicted tables of :func:`predicted_document` as markdown."""
    out = [f"Predicted times on {doc['gpu']['name']} (roofline model, benchmarks/roofline.py): "
           f"milliseconds, forward / backward / forward+backward, and the bound of each pass "
           f"(compute, memory, exp, launch). Host time per launch assumed "
           f"{HOST_SECONDS_PER_LAUNCH * 1e6:g} us.\n"]
    groups = dict.fromkeys((r["loss"], r["shape"], r["dtype"]) for r in doc["predictions"])
    for loss, shape, dtype in groups:
        rows = [r for r in doc["predictions"] if (r["loss"], r["shape"], r["dtype"]) ==
                (loss, shape, dtype)]
        r0 = rows[0]
        out.append(f"**{loss}**, `{shape}` (N={r0['n']}, C={r0['c']}, K={r0['k']}, d={r0['d']}), "
                   f"{dtype}\n")
        out.append("| provider | fwd ms | bwd ms | fwd+bwd ms | bound fwd / bwd | GFLOP | GB "
                   "| Gexp | launches | / floor |")
        out.append("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        floor = next((r for r in rows if r["provider"] == "floor" and r["prediction"]), None)
        for r in rows:
            p = r["prediction"]
            if p is None:
                out.append(f"| {r['provider']} | not modelled: {r['reason']} |||||||||")
                continue
            f, b, fb = p["forward"], p["backward"], p["forward_backward"]
            ratio = (fb["time_s"] / floor["prediction"]["forward_backward"]["time_s"]
                     if floor else float("nan"))
            out.append(f"| {r['provider']} | {_ms(f['time_s'])} | {_ms(b['time_s'])} | "
                       f"{_ms(fb['time_s'])} | {f['bound']} / {b['bound']} | "
                       f"{fb['flops'] / 1e9:.3g} | {fb['bytes'] / 1e9:.3g} | "
                       f"{fb['mufu'] / 1e9:.3g} | {fb['launches']} | {ratio:.2f} |")
        out.append("")
    for dtype, price in doc.get("auto_price", {}).items():
        (lo, *lo_at), (hi, *hi_at) = price["best"], price["worst"]
        out.append(f"`auto`, {dtype}: where s and ds take at least "
                   f"{price['threshold_bytes'] / 2**30:g} GiB ({price['cases']} grid shapes), "
                   f"triton-linear is predicted at {lo:.2f}x (N, C, K = {tuple(lo_at)}) to "
                   f"{hi:.2f}x ({tuple(hi_at)}) the forward+backward time of triton.")
    return "\n".join(out)


def predicted_document(gpu: str, shapes: list[Shape], losses: list[str], dtypes: list[str],
                       providers: tuple = PROVIDERS) -> dict:
    g = GPUS[gpu]
    preds = []
    for shape in shapes:
        for dtype in dtypes:
            for loss in losses:
                k = 1 if loss in SINGLE_PROXY else shape.k
                for provider in providers:
                    p = predict(provider, loss, shape, dtype, g)
                    row = {"loss": loss, "shape": shape.name, "n": shape.n, "c": shape.c, "k": k,
                           "d": shape.d, "dtype": dtype, "provider": provider, "prediction": p}
                    if p is None:
                        row["reason"] = (f"counted on CPU tensors only up to "
                                         f"{MAX_COUNTED_SCORES} scores")
                    preds.append(row)
    return {
        "gpu": {"key": gpu, "name": g.name, "sms": g.sms, "clock_hz": g.clock_hz,
                "peak_flops": g.peak_flops, "hbm_bytes_per_s": g.hbm_bytes_per_s,
                "mufu_per_s": g.mufu_per_s, "sources": list(g.sources)},
        "host_seconds_per_launch": HOST_SECONDS_PER_LAUNCH,
        "tf32": False,
        "auto_price": {dtype: auto_price(gpu, dtype) for dtype in dtypes},
        "predictions": preds,
    }
