"""Fused-linear Triton kernels: every loss straight from ``x_hat`` (N, d) and ``w_hat`` (C*K, d).

Tiles of ``s = x_hat @ w_hat.T`` are computed with ``tl.dot`` (fp32 accumulation) inside the kernels,
reduced at once and never stored: the forward keeps O(N + C) statistics, the backward recomputes the
tiles (flash-attention / Cut Cross-Entropy style). No N x C*K buffer exists in either pass.

Tiling
------
A program's tile is ``BLOCK_M`` samples by ``BLOCK_N = BLOCK_C * KP`` proxy columns: ``BLOCK_C`` whole
classes, each with its ``K`` proxies padded to ``KP`` (the next power of two, masked), so the
intra-class reduction over K happens inside one tile with a reshape to (BLOCK_M, BLOCK_C, KP). Padding
costs ``KP / K`` extra dot work (none for K in {1, 2, 4}; 60 % for K = 10). ``d`` is looped over in
``BLOCK_D`` chunks with masking, so no size has to be a multiple of a tile.

* Row-wise family (MPA-DW, MPA-AP, SoftTriple, ProxyNCA): grid (row tiles, splits of the class
  tiles). Each program runs an online log-sum-exp over its classes and writes one partial LSE per
  row and split (and the positive class similarity); the host combines the splits (and the implicit
  zero logit) with ``torch.logsumexp``. Splits exist only to fill the GPU when N is small.
* Column-wise family (MPA, ProxyAnchor): grid (class tiles, splits of the row tiles); two online
  LSEs per class (positives, negatives), combined the same way.
* Backward: one kernel, ``_backward_kernel``, that *owns* either a row tile (accumulates dx_hat for
  it, looping over class tiles) or a class tile (accumulates dw_hat, looping over row tiles). The
  owned block is read-modified-written in a private fp32 partial buffer (no race: one program per
  block and split), ``d`` chunk by chunk, so no d-sized accumulator has to fit in registers. The
  other gradient is either atomically added (default: one launch, 4 GEMM-equivalents in all) or
  computed by a second launch that owns the other side (deterministic mode).

Options (keyword arguments of :func:`fused_linear_loss`)
--------------------------------------------------------
* ``deterministic``: no order-dependent atomics. Cost: the backward recomputes s twice (once for
  dx_hat, once for dw_hat), so forward + backward does 5 GEMM-equivalents instead of 4 (+25 % GEMM
  work), plus the split partial buffers, which are summed by torch in a fixed order. The forward is
  deterministic in both modes (it has no atomics).
* ``filter_eps``: skip the gradient products of a backward tile when every class-level gradient in it
  satisfies ``|dL/dS_ic| < filter_eps * alpha * unit`` (``unit`` = g/N row-wise, g/|C+| column-wise),
  i.e. when every softmax / sigmoid weight in the tile is below ``filter_eps`` (the role of Cut
  Cross-Entropy's gradient filtering). The recomputation of s still happens, so it saves at most the
  two gradient GEMMs of the skipped tiles. The loss is never affected (the forward is exact). Off
  (0.0) by default, and then bitwise equal to the unfiltered kernels.

  Measured effect (interpreter, fp32, N=64, C=256, K=2, d=64, 32 x 32 tiles, embeddings clustered
  around their class's proxies with noise 0.5, alpha=32, delta=0.1, softmax similarity; relative
  error = max |g_filtered - g_exact| / max |g_exact|):

  ==========  =========  ==================  ==================  ==================
  loss        eps        tiles skipped       rel. err dx_hat     rel. err dw_hat
  ==========  =========  ==================  ==================  ==================
  FILTER_TABLE
  ==========  =========  ==================  ==================  ==================

  Bound: a skipped class entry contributes at most ``filter_eps * alpha * unit * J`` to a gradient
  row, with ``J`` the intra-class Jacobian (<= 1 for "max"/"mean", <= 1 + 2/gamma for "softmax"),
  so the absolute error of a row of dx_hat is at most ``filter_eps * alpha * unit * J * (number of
  skipped classes)``; tests check this bound.
* ``allow_tf32``: fp32 inputs use TF32 tensor cores in ``tl.dot`` (default: follow
  ``torch.backends.cuda.matmul.allow_tf32``). fp16/bf16 inputs always use their tensor cores; the
  class-level gradients are rounded to the input dtype for the gradient products (as flash-attention
  does), after factoring out the global scale so that fp16 does not underflow.

GPU cost model (the large shape N=1024, C=100000, K=4, d=512, bf16): the GEMM floor is 3 GEMMs of
2*N*C*K*d flops (s, ds@W, ds^T@X). Without storing s, an exact fused kernel cannot do fewer than 4:
the row-wise normaliser (LSE over all classes) is known only after a full pass over s, and every
ds entry depends on it, so s is computed once for the statistics and once more for the gradients.
The best exact fused-linear time is therefore about 4/3 of the floor (atomic mode) and 5/3
(deterministic mode); ``filter_eps`` brings it below that when most tiles are negligible.
Extra memory at that shape: the statistics (a few MB), the fp32 dx_hat accumulator (2 MB) and the
fp32 dw_hat accumulator, bounded by processing the proxies in chunks of ``DW_SCRATCH_BYTES``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mpa_kernels._spec import LossSpec
from mpa_kernels.kernels.common import (
    LOSS_CODES,
    LOSS_MPA,
    LOSS_MPA_DW,
    LOSS_SOFT_TRIPLE,
    SIMILARITY_CODES,
    class_similarity,
    class_similarity_vjp,
    loss_logits,
    lse_finalize,
    online_lse_update,
)

# The fp32 dw_hat accumulator of one backward launch is at most this large; more proxies than fit
# are processed in chunks, each cast into the gradient before the next (bounded extra memory).
DW_SCRATCH_BYTES = 256 * 2**20
# Split partial buffers of the owned side are kept under this size.
SPLIT_SCRATCH_BYTES = 128 * 2**20


# ----------------------------------------------------------------------------------------------
# Device helpers (the intra-class reduction, logits and online LSE are common.py's)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _columns(tile, C, K: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Classes of class tile ``tile`` and, per tile column ``c_local * KP + k``, its proxy row.

    Padded proxies (k >= K) are masked: their row ``c * K + k`` belongs to the next class.
    """
    cls = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_C * KP)
    k = j % KP
    col_cls = tile * BLOCK_C + j // KP
    prow = col_cls.to(tl.int64) * K + k
    proxy_mask = (k < K) & (col_cls < C)
    return cls, prow, proxy_mask


@triton.jit
def _similarity_tile(x_ptr, w_ptr, rows, row_mask, prow, proxy_mask, D, stride_x, stride_w,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """s = x[rows] @ w[prow].T in fp32, d looped in masked chunks (masked rows/proxies give 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + prow[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(x_rows + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :], mask=proxy_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _class_tile(s, inv_gamma, SIM: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Eq. 1 on a flat dot tile: its [M, C, KP] view ``s3`` and common's ``(S, q)``. Padded
    proxies hold s = 0 (masked loads); padded classes are masked at the logit level."""
    s3 = tl.reshape(s, (BLOCK_M, BLOCK_C, KP))
    k_valid = (tl.arange(0, KP) < K)[None, None, :]
    S, q = class_similarity(s3, k_valid, inv_gamma, K, SIM)
    return s3, S, q


@triton.jit
def _tile_logits(S, cls, labels, row_mask, C, alpha, delta, LOSS: tl.constexpr):
    """common's per-loss logits of a tile with the positive / in-range masks. ``include`` says
    which logits enter a row-wise log-sum-exp: MPA-DW's runs over negatives only (its positive
    has a softplus term of its own); column-wise kernels split ``valid`` by ``pos``."""
    pos = labels[:, None] == cls[None, :]
    valid = row_mask[:, None] & (cls < C)[None, :]
    z, sign = loss_logits(S, pos, alpha, delta, LOSS)
    if LOSS == LOSS_MPA_DW:
        include = valid & (pos == 0)
    else:
        include = valid
    return z, sign, pos, valid, include


# ----------------------------------------------------------------------------------------------
# Forward kernels. Each program's partial LSEs start empty (m = -inf, l = 0); the host adds the
# implicit zero logit once when it combines the splits.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_forward_kernel(
    x_ptr, w_ptr, labels_ptr, lse_part_ptr, spos_part_ptr,
    N, C, D, stride_x, stride_w, tiles_per_split, num_tiles,
    alpha, delta, inv_gamma,
    LOSS: tl.constexpr, SIM: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    spos = tl.zeros((BLOCK_M,), tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, num_tiles)):
        cls, prow, proxy_mask = _columns(tile, C, K, KP, BLOCK_C)
        s = _similarity_tile(x_ptr, w_ptr, rows, row_mask, prow, proxy_mask, D, stride_x,
                             stride_w, BLOCK_M, BLOCK_C * KP, BLOCK_D, PRECISION)
        s3, S, q = _class_tile(s, inv_gamma, SIM, K, KP, BLOCK_M, BLOCK_C)
        z, sign, pos, valid, include = _tile_logits(S, cls, labels, row_mask, C, alpha, delta,
                                                    LOSS)
        m, l = online_lse_update(m, l, z, include, 1)
        spos += tl.sum(tl.where(pos & valid, S, 0.0), 1)
    out = split.to(tl.int64) * N + rows
    tl.store(lse_part_ptr + out, lse_finalize(m, l), mask=row_mask)
    tl.store(spos_part_ptr + out, spos, mask=row_mask)


@triton.jit
def _column_forward_kernel(
    x_ptr, w_ptr, labels_ptr, lse_pos_part_ptr, lse_neg_part_ptr,
    N, C, D, stride_x, stride_w, tiles_per_split, num_tiles,
    alpha, delta, inv_gamma,
    SIM: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    cls, prow, proxy_mask = _columns(pid, C, K, KP, BLOCK_C)
    m_pos = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    l_pos = tl.zeros((BLOCK_C,), tl.float32)
    m_neg = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    l_neg = tl.zeros((BLOCK_C,), tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, num_tiles)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        s = _similarity_tile(x_ptr, w_ptr, rows, row_mask, prow, proxy_mask, D, stride_x,
                             stride_w, BLOCK_M, BLOCK_C * KP, BLOCK_D, PRECISION)
        s3, S, q = _class_tile(s, inv_gamma, SIM, K, KP, BLOCK_M, BLOCK_C)
        z, sign, pos, valid, include = _tile_logits(S, cls, labels, row_mask, C, alpha, delta,
                                                    LOSS_MPA)
        m_pos, l_pos = online_lse_update(m_pos, l_pos, z, valid & pos, 0)
        m_neg, l_neg = online_lse_update(m_neg, l_neg, z, valid & (pos == 0), 0)
    out = split.to(tl.int64) * C + cls
    cls_mask = cls < C
    tl.store(lse_pos_part_ptr + out, lse_finalize(m_pos, l_pos), mask=cls_mask)
    tl.store(lse_neg_part_ptr + out, lse_finalize(m_neg, l_neg), mask=cls_mask)


# ----------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------

# Class-level gradients from the saved statistics, in units of ``unit`` (g/N row-wise, g/|C+|
# column-wise; the host multiplies the result by it, so fp16 never sees g/N-sized values).
# With common's logits z = alpha (sign S + offset), dz/dS = alpha sign, and a log-sum-exp
# L = log(sum_j e^z_j) has dL/dz_j = e^(z_j - L); so every LSE term gives alpha sign e^(z - L).
#   row-wise, L = lse_i (saved; with the zero logit for MPA-DW / MPA-AP), unit g/N:
#     MPA-DW:  the negatives' LSE term, plus for c = y the softplus term
#              d/dS softplus(-alpha (S - delta)) = -alpha sigmoid(-alpha (S_iy - delta)) = coef_i;
#     MPA-AP:  the LSE term only (the positive's sign is -1), coef_i = 0;
#     CE:      alpha (p_ic - [c = y]): the LSE term and coef_i = -alpha.
#   column-wise, L = sum_c P_c / |C+| + sum_c N_c / C, unit g/|C+|:
#     positives -alpha e^(z - P_c), negatives alpha (|C+| / C) e^(z - N_c); the host folds
#     |C+| / C into the negatives' statistic: stat1_c = N_c - log(|C+| / C). coef = 0.
@triton.jit
def _class_grad(S, cls, rows, labels, row_mask, C, stat0_ptr, stat1_ptr, alpha, delta,
                LOSS: tl.constexpr):
    z, sign, pos, valid, include = _tile_logits(S, cls, labels, row_mask, C, alpha, delta, LOSS)
    if LOSS == LOSS_MPA:
        cls_mask = cls < C
        lse_pos = tl.load(stat0_ptr + cls, mask=cls_mask, other=0.0)
        lse_neg = tl.load(stat1_ptr + cls, mask=cls_mask, other=0.0)
        lse = tl.where(pos, lse_pos[None, :], lse_neg[None, :])
        coef = tl.zeros_like(S)
    else:
        lse = tl.load(stat0_ptr + rows, mask=row_mask, other=0.0)[:, None]
        coef = tl.where(pos, tl.load(stat1_ptr + rows, mask=row_mask, other=0.0)[:, None], 0.0)
    dS = tl.where(include, alpha * sign * tl.exp(z - lse), 0.0)
    return tl.where(valid, dS + coef, 0.0)


@triton.jit
def _backward_kernel(
    x_ptr, w_ptr, labels_ptr, stat0_ptr, stat1_ptr, own_ptr, other_ptr,
    N, C, D, stride_x, stride_w, first_own_tile, own_rows, tiles_per_split, num_loop_tiles,
    alpha, delta, inv_gamma, filter_threshold,
    LOSS: tl.constexpr, SIM: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    OWN_COLUMNS: tl.constexpr, ATOMIC_OTHER: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute s tile by tile and accumulate dx_hat = ds @ w_hat and dw_hat = ds^T @ x_hat.

    The program owns one tile of the ``OWN_COLUMNS`` side (a class tile for dw_hat, else a row
    tile for dx_hat) and loops over its split of the other side's tiles. The owned gradient goes
    to ``own_ptr`` (fp32, [split, own_rows, D], read-modified-written only by this program);
    with ``ATOMIC_OTHER`` the other gradient is atomically added to ``other_ptr`` (fp32).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    first = split * tiles_per_split
    if OWN_COLUMNS:
        cls, prow, proxy_mask = _columns(first_own_tile + pid, C, K, KP, BLOCK_C)
        own_index = prow - first_own_tile * BLOCK_C * K
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        own_index = rows.to(tl.int64)
    own_base = own_ptr + split.to(tl.int64) * own_rows * D + own_index[:, None] * D
    for tile in range(first, tl.minimum(first + tiles_per_split, num_loop_tiles)):
        if OWN_COLUMNS:
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < N
            labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        else:
            cls, prow, proxy_mask = _columns(tile, C, K, KP, BLOCK_C)
        s = _similarity_tile(x_ptr, w_ptr, rows, row_mask, prow, proxy_mask, D, stride_x,
                             stride_w, BLOCK_M, BLOCK_C * KP, BLOCK_D, PRECISION)
        s3, S, q = _class_tile(s, inv_gamma, SIM, K, KP, BLOCK_M, BLOCK_C)
        dS = _class_grad(S, cls, rows, labels, row_mask, C, stat0_ptr, stat1_ptr, alpha, delta,
                         LOSS)
        keep = True
        if FILTER:
            keep = tl.max(tl.max(tl.abs(dS), 1), 0) >= filter_threshold
        if keep:
            ds = tl.reshape(class_similarity_vjp(s3, q, S, dS, inv_gamma, SIM),
                            (BLOCK_M, BLOCK_C * KP))
            # Rounded to the input dtype for the tensor cores (flash-attention does the same);
            # dS is in units of g/N or g/|C+|, O(alpha), so fp16 neither under- nor overflows.
            ds = ds.to(x_ptr.dtype.element_ty)
            x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
            w_rows = w_ptr + prow[:, None] * stride_w
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                x_mask = row_mask[:, None] & d_mask[None, :]
                w_mask = proxy_mask[:, None] & d_mask[None, :]
                if OWN_COLUMNS:
                    x = tl.load(x_rows + offs_d[None, :], mask=x_mask, other=0.0)
                    own = tl.dot(tl.trans(ds), x, input_precision=PRECISION)
                    own_mask = w_mask
                else:
                    w = tl.load(w_rows + offs_d[None, :], mask=w_mask, other=0.0)
                    own = tl.dot(ds, w, input_precision=PRECISION)
                    own_mask = x_mask
                own_ptrs = own_base + offs_d[None, :]
                tl.store(own_ptrs, tl.load(own_ptrs, mask=own_mask, other=0.0) + own,
                         mask=own_mask)
                if ATOMIC_OTHER:
                    if OWN_COLUMNS:
                        w = tl.load(w_rows + offs_d[None, :], mask=w_mask, other=0.0)
                        tl.atomic_add(other_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
                                      tl.dot(ds, w, input_precision=PRECISION), mask=x_mask)
                    else:
                        x = tl.load(x_rows + offs_d[None, :], mask=x_mask, other=0.0)
                        tl.atomic_add(other_ptr + prow[:, None] * D + offs_d[None, :],
                                      tl.dot(tl.trans(ds), x, input_precision=PRECISION),
                                      mask=w_mask)


# ----------------------------------------------------------------------------------------------
# Host side: tile choice, launchers, autograd
# ----------------------------------------------------------------------------------------------


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class TileConfig:
    """One kernel specialisation's tile sizes (``block_c`` whole classes of ``kp`` columns)."""

    block_m: int
    block_c: int
    block_d: int
    kp: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Options:
    """The knobs of :func:`fused_linear_loss`, resolved (no ``None`` left)."""

    deterministic: bool
    filter_eps: float
    allow_tf32: bool


def tile_config(proxies_per_class: int, dtype: torch.dtype, backward: bool,
                interpret: bool | None = None) -> TileConfig:
    """Tiles for one launch. On a GPU: 128 x 128 forward, 64 x 64 backward (it also holds ds and
    the class-level intermediates), d chunks of 64 (32 for fp32, to fit sm_80's shared memory
    with 3 stages). Under the interpreter: 32-wide tiles, few enough programs to be quick yet
    several tiles per side on the test shapes, so masking and the loops are exercised."""
    kp = triton.next_power_of_2(proxies_per_class)
    if interpreting() if interpret is None else interpret:
        block_m, block_n, block_d, warps, stages = 32, 32, 32, 4, 1
    elif backward:
        block_m, block_n, block_d, warps, stages = 64, 64, 64, 8, 2
    else:
        block_m, block_n, block_d, warps, stages = 128, 128, 64, 8, 3
    if dtype == torch.float32:
        block_d = min(block_d, 32)
    block_n = max(block_n, kp)
    return TileConfig(block_m, block_n // kp, block_d, kp, warps, stages)


def _target_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU (4 per SM); under the interpreter a few, so splits happen."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _splits(num_own: int, num_loop: int, target: int, max_splits: int) -> tuple[int, int]:
    """Split the loop side in ``splits`` ranges of ``per_split`` tiles so that about ``target``
    programs run; none of the ranges is empty."""
    splits = max(1, min(num_loop, -(-target // num_own), max_splits))
    per_split = -(-num_loop // splits)
    return -(-num_loop // per_split), per_split


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fused_linear_forward(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, spec: LossSpec,
                         options: Options):
    """The loss (fp32 scalar) and what the backward needs: two statistic vectors and the
    denominator ``unit_den`` of the gradient unit (N row-wise, |C+| column-wise)."""
    n, d = x.shape
    c, k = spec.num_classes, spec.proxies_per_class
    cfg = tile_config(k, x.dtype, backward=False)
    common = dict(
        alpha=spec.alpha, delta=spec.delta, inv_gamma=1.0 / spec.gamma,
        K=k, KP=cfg.kp, SIM=SIMILARITY_CODES[spec.similarity], BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d, PRECISION=_precision(x.dtype, options.allow_tf32),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    row_tiles = triton.cdiv(n, cfg.block_m)
    class_tiles = triton.cdiv(c, cfg.block_c)
    target = _target_programs(x.device)
    code = LOSS_CODES[spec.loss]
    f32 = dict(dtype=torch.float32, device=x.device)
    zero_logit = torch.zeros(1, 1, **f32)
    with _device_guard(x.device):
        if code == LOSS_MPA.value:
            splits, per_split = _splits(class_tiles, row_tiles, target, max(1, 2**24 // c))
            lse_pos = torch.empty(splits, c, **f32)
            lse_neg = torch.empty(splits, c, **f32)
            _column_forward_kernel[(class_tiles, splits)](
                x, w, labels, lse_pos, lse_neg, n, c, d, x.stride(0), w.stride(0), per_split,
                row_tiles, **common)
            P = torch.logsumexp(torch.cat([zero_logit.expand(1, c), lse_pos]), 0)
            Nc = torch.logsumexp(torch.cat([zero_logit.expand(1, c), lse_neg]), 0)
            num_present = (torch.bincount(labels, minlength=c) > 0).sum().to(torch.float32)
            loss = P.sum() / num_present + Nc.sum() / c
            return loss, (P, Nc - torch.log(num_present / c)), num_present
        splits, per_split = _splits(row_tiles, class_tiles, target, max(1, 2**24 // n))
        lse_part = torch.empty(splits, n, **f32)
        spos_part = torch.empty(splits, n, **f32)
        _row_forward_kernel[(row_tiles, splits)](
            x, w, labels, lse_part, spos_part, n, c, d, x.stride(0), w.stride(0), per_split,
            class_tiles, LOSS=code, **common)
    spos = spos_part.sum(0)
    if code == LOSS_SOFT_TRIPLE.value:
        lse = torch.logsumexp(lse_part, 0)
        per_row = lse - spec.alpha * (spos - spec.delta)
        coef = torch.full_like(spos, -spec.alpha)
    else:
        lse = torch.logsumexp(torch.cat([zero_logit.expand(1, n), lse_part]), 0)
        if code == LOSS_MPA_DW.value:
            margin = -spec.alpha * (spos - spec.delta)
            per_row = torch.nn.functional.softplus(margin) + lse
            coef = -spec.alpha * torch.sigmoid(margin)
        else:
            per_row = lse
            coef = torch.zeros_like(spos)
    return per_row.mean(), (lse, coef), torch.tensor(float(n), **f32)


def _launch_backward(x, w, labels, stats, spec, options, cfg, own_columns, other, own_tiles,
                     first_own_tile, own_rows, max_splits):
    """One launch of :func:`_backward_kernel` over ``own_tiles`` owned tiles; returns the owned
    gradient (fp32, summed over the splits in a fixed order)."""
    n, d = x.shape
    c, k = spec.num_classes, spec.proxies_per_class
    num_loop = triton.cdiv(n, cfg.block_m) if own_columns else triton.cdiv(c, cfg.block_c)
    splits, per_split = _splits(own_tiles, num_loop, _target_programs(x.device), max_splits)
    own = torch.zeros(splits, own_rows, d, dtype=torch.float32, device=x.device)
    _backward_kernel[(own_tiles, splits)](
        x, w, labels, stats[0], stats[1], own, own if other is None else other,
        n, c, d, x.stride(0), w.stride(0), first_own_tile, own_rows, per_split, num_loop,
        spec.alpha, spec.delta, 1.0 / spec.gamma, options.filter_eps * spec.alpha,
        LOSS=LOSS_CODES[spec.loss], SIM=SIMILARITY_CODES[spec.similarity], K=k, KP=cfg.kp,
        OWN_COLUMNS=own_columns, ATOMIC_OTHER=other is not None,
        FILTER=options.filter_eps > 0, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
        BLOCK_D=cfg.block_d, PRECISION=_precision(x.dtype, options.allow_tf32),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return own[0] if splits == 1 else own.sum(0)


def fused_linear_backward(x, w, labels, stats, unit, spec: LossSpec, options: Options):
    """dx_hat and dw_hat (in the inputs' dtypes) for a loss gradient of ``unit`` times the kernel
    units. Deterministic: one launch owning row tiles (dx_hat), one owning class tiles (dw_hat).
    Otherwise one launch owns the side with more tiles and atomically adds the other."""
    n, d = x.shape
    c, k = spec.num_classes, spec.proxies_per_class
    cfg = tile_config(k, x.dtype, backward=True)
    row_tiles = triton.cdiv(n, cfg.block_m)
    class_tiles = triton.cdiv(c, cfg.block_c)
    split_cap = max(1, SPLIT_SCRATCH_BYTES // (4 * d * max(n, cfg.block_c * k)))
    dx = dx32 = None
    own_rows_first = not options.deterministic and row_tiles > class_tiles
    with _device_guard(x.device):
        if options.deterministic or own_rows_first:
            dw32 = None if options.deterministic else torch.zeros(c * k, d, dtype=torch.float32,
                                                                  device=x.device)
            dx32 = _launch_backward(x, w, labels, stats, spec, options, cfg, False, dw32,
                                    row_tiles, 0, n, split_cap)
            dx = (dx32 * unit).to(x.dtype)
            if dw32 is not None:
                return dx, (dw32 * unit).to(w.dtype)
        else:
            dx32 = torch.zeros(n, d, dtype=torch.float32, device=x.device)
        # dw_hat in chunks of whole class tiles, each accumulated in fp32 and cast at once.
        dw = torch.empty_like(w)
        tile_rows = cfg.block_c * k
        chunk_tiles = max(1, DW_SCRATCH_BYTES // (4 * d * tile_rows))
        for first in range(0, class_tiles, chunk_tiles):
            tiles = min(chunk_tiles, class_tiles - first)
            rows = min(tiles * tile_rows, c * k - first * tile_rows)
            cap = max(1, DW_SCRATCH_BYTES // (4 * d * rows))
            part = _launch_backward(x, w, labels, stats, spec, options, cfg, True,
                                    None if options.deterministic else dx32, tiles, first,
                                    rows, cap)
            start = first * tile_rows
            dw[start:start + rows] = (part * unit).to(w.dtype)
    if dx is None:
        dx = (dx32 * unit).to(x.dtype)
    return dx, dw


class FusedLinearLossFunction(torch.autograd.Function):
    """Autograd wrapper: forward keeps O(N + C) statistics, backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, x, w, labels, spec, options):
        loss, stats, unit_den = fused_linear_forward(x, w, labels, spec, options)
        ctx.save_for_backward(x, w, labels, stats[0], stats[1], unit_den)
        ctx.spec, ctx.options = spec, options
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, w, labels, stat0, stat1, unit_den = ctx.saved_tensors
        unit = grad.to(torch.float32) / unit_den
        dx, dw = fused_linear_backward(x, w, labels, (stat0, stat1), unit, ctx.spec, ctx.options)
        return dx, dw, None, None, None


def fused_linear_loss(x_hat: torch.Tensor, w_hat: torch.Tensor, labels: torch.Tensor,
                      spec: LossSpec, *, deterministic: bool | None = None,
                      filter_eps: float = 0.0, allow_tf32: bool | None = None) -> torch.Tensor:
    """The similarity term of ``spec.loss`` from normalised ``x_hat`` (N, d) and ``w_hat``
    (C*K, d), as an fp32 scalar differentiable in both.

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``;
    ``allow_tf32=None`` follows ``torch.backends.cuda.matmul.allow_tf32``; ``filter_eps`` is
    described in the module docstring (0 = exact).
    """
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(f"filter_eps must be a real number, got {type(filter_eps).__name__}")
    if not (math.isfinite(filter_eps) and 0.0 <= filter_eps < 1.0):
        raise ValueError(f"filter_eps must lie in [0, 1), got {filter_eps}")
    options = Options(
        torch.are_deterministic_algorithms_enabled() if deterministic is None
        else bool(deterministic),
        float(filter_eps),
        torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else bool(allow_tf32),
    )
    if x_hat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        # fp64 (or anything else Triton's dot does not take) is computed in fp32.
        x_hat, w_hat = x_hat.float(), w_hat.float()
    elif w_hat.dtype != x_hat.dtype:
        w_hat = w_hat.to(x_hat.dtype)
    return FusedLinearLossFunction.apply(x_hat.contiguous(), w_hat.contiguous(),
                                         labels.contiguous(), spec, options)
