"""Fused-linear Triton kernels: every loss straight from ``x_hat`` (N, d) and ``w_hat`` (C*K, d).

Tiles of ``s = x_hat @ w_hat.T`` are computed with ``tl.dot`` (fp32 accumulation) inside the
kernels, reduced at once and never stored: the forward keeps O(N + C) statistics, the backward
recomputes the tiles (flash-attention / Cut Cross-Entropy style). No N x C*K buffer exists in either
pass. The intra-class reduction over K, the logits and the online log-sum-exp are :mod:`.common`'s
helpers, shared with the kernels over a materialised s (:mod:`.similarity`).

Tiling
------
A tile is ``BLOCK_M`` samples by ``BLOCK_C * KP`` proxy columns: ``BLOCK_C`` whole classes, each
with its ``K`` proxies padded to ``KP`` (the next power of two, masked), so the intra-class
reduction over K happens inside one tile with a reshape to (BLOCK_M, BLOCK_C, KP). Padding costs
``KP / K`` extra dot work (none for K in {1, 2, 4}; 60 % for K = 10). ``d`` is looped over in
``BLOCK_D`` chunks with masking, so no size has to be a multiple of a tile.

Tiles and registers
-------------------
The tile choice is a register budget: an fp32 tile of ``BLOCK_M x columns`` spread over
``32 * warps`` threads costs ``BLOCK_M * columns / (32 * warps)`` registers per thread for each
copy that is live at once, and a thread has 255. Past that ptxas spills to local memory, and a
GEMM-bound loop that spills runs at a fraction of the tensor cores' rate. What is live at once:

* forward: the dot accumulator ``s``, the softmax weights ``q`` (and their exponentials) over the
  ``[BLOCK_M, BLOCK_C, KP]`` view, the logits ``z`` and the online LSE's exponentials, plus the
  operand fragments of the next ``tl.dot``: about four tiles. 128 x 64 on 8 warps is 32 registers a
  tile (~130 with four of them); 128 x 128 was 64 a tile, which no warp count below 16 keeps
  under 255, and it spilled 0.1-0.8 KiB per thread. 128 x 64 halves the tile but keeps 43 MACs
  per loaded operand element (128 x 128: 64), so the d loop still feeds the tensor cores from L2.
* backward: the recomputed ``s``, ``q``, ``dS`` and ``ds`` (the latter in the input dtype, as the
  operand of both gradient products) stay live through the inner d loop, which adds two
  ``64 x BLOCK_D`` fp32 products and their operands. 64 x 64 on 8 warps is 16 registers a tile
  (64 x 64 on 4 warps was 32 and spilled ~1 KiB per thread); it stays square, as both owner
  sides need (``BLOCK_M = BLOCK_C * KP``).
* ``BLOCK_D`` (the d chunk, the dot's reduction depth): 32 for fp16/bf16 and 16 for fp32, 64
  bytes of a row per load either way. An fp32 ``ieee`` dot runs on FMA units, not tensor cores,
  and holds its operand slices in registers in proportion to ``BLOCK_D`` (64 x 64 x 32 spilled,
  64 x 64 x 16 does not). That path takes 64 x 64 forward tiles and one stage (no second buffer
  for the next d chunk): it is bound by its FMAs (256 per thread per chunk), not by the loads a
  second buffer would hide, and that buffer costs ~90 registers a thread there. fp32 with TF32
  runs on the tensor cores and takes the 16-bit forward tile, 128 x 64.
* ptxas gets the whole budget, ``.maxnreg 255`` (:data:`MAX_REGISTERS`): left to itself it
  sometimes holds a kernel that needs 130-170 registers to 128, for two blocks per SM, and spills
  to get there (seen with the ptxas of Triton 3.6 and of 3.9); a spilling inner loop costs more
  than the second block gains.

``python -m mpa_kernels.kernels.compile_check --resources`` prints registers, stack, shared memory
and occupancy for every variant on sm_80 and sm_90 and fails on any stack; the tests run it.
Registers bound nearly every variant to one block of 8 warps per SM, which leaves latency hiding
to the warps of that block and to the loads of the next d chunk; the backward sits closest to
the budget (up to ~250 registers), so a change there is checked with ``--resources`` first.

The forward returns the terms of the backends' contract (:mod:`mpa_kernels.backends`; the front
end reduces them), the backward takes their gradient:

* Row-wise family (MPA-DW, MPA-AP, SoftTriple, ProxyNCA): grid (row tiles, splits of the class
  tiles). Each program runs an online log-sum-exp over its classes and writes, per row and split,
  the partial LSE (no zero logit) and the positive term outside it (MPA-DW's softplus,
  SoftTriple's ``-z_iy``); :func:`mpa_kernels.kernels.launch.merge_splits` (one small launch,
  shared with the kernels over s) merges them into ``(lse, extra)``. Splits exist only to fill the
  GPU when N is small.
* Column-wise family (MPA, ProxyAnchor): grid (class tiles, splits of the row tiles); two online
  LSEs per class (positives, negatives), merged the same way into ``(P, N)``, zero logit added.
* Backward: one kernel, :func:`_backward_kernel`, whose program *owns* a class tile (accumulates
  dw_hat for it, looping over row tiles) or a row tile (dx_hat, looping over class tiles). The
  owned block is read-modified-written in a private fp32 partial buffer, ``d`` chunk by chunk, so
  no d-sized accumulator has to fit in registers and no two programs write the same place.
  Default: one launch of class-tile owners that also ``atomic_add`` their share of dx_hat.
  Deterministic: a row-tile-owner launch for dx_hat, then a class-tile-owner launch for dw_hat.
  dw_hat is produced in chunks of at most ``DW_SCRATCH_BYTES`` of fp32, each cast into the
  gradient at once, so the fp32 scratch is bounded whatever C is.

The loss, the similarity mode, the owner side and the atomics are runtime switches (uniform
branches, free next to the dots); only the dtype, TF32, KP and the family's forward kernel are
compiled variants: :data:`SPECIALISATIONS` lists all 60 and the 2 of the merge, and the compile
check (:mod:`.compile_check`) builds each for sm_80 and sm_90.

Options (keyword arguments of :func:`fused_linear_terms`)
---------------------------------------------------------
* ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``): no
  order-dependent atomics; results are bitwise reproducible run to run (the split partials are
  merged in a fixed order). Cost: the backward recomputes s twice, once per owner side, so
  forward + backward does 5 GEMM-equivalents instead of 4 (+25 % of the matmul work), plus one
  fp32 partial buffer of ``splits x N x d`` (at most ``SPLIT_SCRATCH_BYTES``). The forward is
  deterministic in both modes (it has no atomics).
* ``filter_eps`` (default 0, off): skip the two gradient products of a backward tile when every
  class-level gradient in it satisfies ``|dL/dS_ic| < filter_eps * alpha * unit`` (``unit`` = g/N
  row-wise, g/|C+| column-wise), i.e. when every softmax / sigmoid weight of the tile is below
  ``filter_eps`` (the role of Cut Cross-Entropy's gradient filtering). s is still recomputed, so
  it saves at most the two gradient GEMMs of the skipped tiles, i.e. up to half of the backward.
  The loss is never affected (the forward is exact); with 0 every tile passes, which is the exact
  kernel.

  Bound: a skipped entry contributes at most ``filter_eps * alpha * unit * J`` to each element of
  a gradient row, ``J`` the intra-class Jacobian summed over k (1 for "max"/"mean", at most
  1 + 2/gamma for "softmax"); so an element of dx_hat is off by at most that times the number of
  skipped classes, and one of dw_hat by at most that times the number of skipped samples. The
  tests check this bound.

  The filter pays where the class softmax of a sample is peaked (a few hard negatives,
  many far classes, large C), as in language-model heads. With proxies and alpha = 32 the
  weights of far classes are ~e^(alpha (S_far - S_hard)), tiny only when the similarity gap is
  large; MPA's class-wise LSE runs over the N samples of a batch, whose weights are ~1/N, so it
  filters almost nothing below eps = 1e-2. A safe setting keeps ``filter_eps * (number of
  classes)`` well below the gradient accuracy wanted.
* ``allow_tf32`` (default: ``torch.backends.cuda.matmul.allow_tf32``): fp32 inputs use TF32
  tensor cores in ``tl.dot``. fp16/bf16 inputs always use their tensor cores; the class-level
  gradients are rounded to the input dtype for the gradient products (as flash-attention does),
  after factoring the largest coefficient of the terms' gradient out (g/N or g/|C+| for the
  mean) so that fp16 does not underflow.

GPU cost model (not yet measured: no GPU was available when this was written)
-----------------------------------------------------------------------------
At the large shape (N=1024, C=100000, K=4, d=512, bf16) the GEMM floor is 3 GEMMs of
2*N*C*K*d = 0.42 TFLOP (s, ds @ W, ds^T @ X). Without storing s, an exact fused kernel cannot do
fewer than 4: the row-wise normaliser (the LSE over all classes) is known only after a full pass
over s, and every ds entry depends on it, so s is computed once for the statistics and once more for
the gradients. The best exact time is therefore about 4/3 of the floor in the default mode and 5/3
in the deterministic mode, if ``tl.dot`` tiles run as fast as cuBLAS; ``filter_eps`` goes below
that when most tiles are negligible. Extra memory at that shape: the statistics (< 1 MB), the fp32
dx_hat accumulator (2 MB), the fp32 dw_hat chunk scratch (``DW_SCRATCH_BYTES`` = 256 MiB) and the
split partials (<= ``SPLIT_SCRATCH_BYTES``): under 0.4 GiB, against 1.6 GiB for s and ds in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mpa_kernels._spec import LossSpec
from mpa_kernels.kernels import triton_interpreting
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
    softplus,
    terms_vjp,
)
from mpa_kernels.kernels.launch import (
    MERGE_SPECIALISATIONS,
    TRITON_DTYPES,
    Specialisation,
    merge_splits,
    plan_splits,
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
def _columns(tile, C, K, KP: tl.constexpr, BLOCK_C: tl.constexpr):
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
def _class_tile(s, inv_gamma, K, SIM, KP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Eq. 1 on a flat dot tile: its [M, C, KP] view ``s3`` and common's ``(S, q)``. Padded
    proxies hold s = 0 (masked loads); padded classes are masked at the logit level."""
    s3 = tl.reshape(s, (BLOCK_M, BLOCK_C, KP))
    k_valid = (tl.arange(0, KP) < K)[None, None, :]
    S, q = class_similarity(s3, k_valid, inv_gamma, K, SIM)
    return s3, S, q


@triton.jit
def _tile_logits(S, cls, labels, row_mask, C, alpha, delta, loss):
    """common's per-loss logits of a tile with the positive / in-range masks. ``include`` says
    which logits enter a row-wise log-sum-exp: MPA-DW's runs over negatives only (its positive
    has a softplus term of its own); column-wise kernels split ``valid`` by ``pos``.

    ``loss`` is a runtime code (one compiled kernel serves every loss). common's
    ``loss_logits`` takes a constexpr, but it has only two formulas, SoftTriple's and the one
    MPA, MPA-DW and MPA-AP share, so each branch below calls it with a constant."""
    pos = labels[:, None] == cls[None, :]
    valid = row_mask[:, None] & (cls < C)[None, :]
    if loss == LOSS_SOFT_TRIPLE:
        z, sign = loss_logits(S, pos, alpha, delta, LOSS_SOFT_TRIPLE)
    else:
        z, sign = loss_logits(S, pos, alpha, delta, LOSS_MPA)
    include = valid & ((pos == 0) | (loss != LOSS_MPA_DW))
    return z, sign, pos, valid, include


# ----------------------------------------------------------------------------------------------
# Forward kernels: the split partials part[2, splits, M] of .launch. Each program's partial LSEs
# start empty (m = -inf, l = 0); the merge adds the implicit zero logit where the terms have it.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_forward_kernel(
    x_ptr, w_ptr, labels_ptr, part_ptr,
    N, C, K, D, stride_x, stride_w, tiles_per_split, num_tiles,
    alpha, delta, inv_gamma, SIM, loss,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per row and class range of this split: ``part[0]`` the partial LSE of the logits that enter
    the row's LSE, ``part[1]`` the positive term outside it (MPA-DW ``softplus(z_iy)``,
    SoftTriple ``-z_iy``, MPA-AP 0; 0 when the row's label is not in this range)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    extra = tl.zeros((BLOCK_M,), tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, num_tiles)):
        cls, prow, proxy_mask = _columns(tile, C, K, KP, BLOCK_C)
        s = _similarity_tile(x_ptr, w_ptr, rows, row_mask, prow, proxy_mask, D, stride_x,
                             stride_w, BLOCK_M, BLOCK_C * KP, BLOCK_D, PRECISION)
        s3, S, q = _class_tile(s, inv_gamma, K, SIM, KP, BLOCK_M, BLOCK_C)
        z, sign, pos, valid, include = _tile_logits(S, cls, labels, row_mask, C, alpha, delta,
                                                    loss)
        m, l = online_lse_update(m, l, z, include, 1)
        # A row's one positive: its logit picked out of the tile, then one softplus per row.
        hit = pos & valid
        z_pos = tl.sum(tl.where(hit, z, 0.0), 1)
        found = tl.max(hit.to(tl.int32), 1) > 0
        term = tl.where(loss == LOSS_MPA_DW, softplus(z_pos),
                        tl.where(loss == LOSS_SOFT_TRIPLE, -z_pos, 0.0))
        extra += tl.where(found, term, 0.0)
    out = part_ptr + split.to(tl.int64) * N + rows
    tl.store(out, lse_finalize(m, l), mask=row_mask)
    tl.store(out + tl.num_programs(1).to(tl.int64) * N, extra, mask=row_mask)


@triton.jit
def _column_forward_kernel(
    x_ptr, w_ptr, labels_ptr, part_ptr,
    N, C, K, D, stride_x, stride_w, tiles_per_split, num_tiles,
    alpha, delta, inv_gamma, SIM, loss,
    KP: tl.constexpr,
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
        s3, S, q = _class_tile(s, inv_gamma, K, SIM, KP, BLOCK_M, BLOCK_C)
        z, sign, pos, valid, include = _tile_logits(S, cls, labels, row_mask, C, alpha, delta,
                                                    loss)
        m_pos, l_pos = online_lse_update(m_pos, l_pos, z, valid & pos, 0)
        m_neg, l_neg = online_lse_update(m_neg, l_neg, z, valid & (pos == 0), 0)
    out = part_ptr + split.to(tl.int64) * C + cls
    cls_mask = cls < C
    tl.store(out, lse_finalize(m_pos, l_pos), mask=cls_mask)
    tl.store(out + tl.num_programs(1).to(tl.int64) * C, lse_finalize(m_neg, l_neg), mask=cls_mask)


# ----------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------

# Class-level gradients dL/dS of a tile from the terms (saved by the forward) and their gradient g,
# the latter divided by ``unit`` = max |g| (the host multiplies the result back, so that fp16
# never sees g/N-sized values): dL/dz from common.terms_vjp (its derivation is written there,
# shared with the kernels over s), and dz/dS = alpha sign (common.loss_logits).
@triton.jit
def _class_grad(S, cls, rows, labels, row_mask, N, C, terms_ptr, grad_ptr, alpha, delta, loss):
    z, sign, pos, valid, include = _tile_logits(S, cls, labels, row_mask, C, alpha, delta, loss)
    dz = terms_vjp(z, pos, include, rows, row_mask, cls, cls < C, N, C, terms_ptr, grad_ptr,
                   loss)
    return tl.where(valid, alpha * sign * dz, 0.0)


@triton.jit
def _backward_kernel(
    x_ptr, w_ptr, labels_ptr, terms_ptr, grad_ptr, own_ptr, dx_ptr,
    N, C, K, D, stride_x, stride_w, first_own_tile, own_rows, tiles_per_split, num_loop_tiles,
    alpha, delta, inv_gamma, SIM, loss, filter_threshold, own_columns, atomic_dx,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute s tile by tile and accumulate dx_hat = ds @ w_hat or dw_hat = ds^T @ x_hat.

    The program owns one tile, a class tile (``own_columns``: it accumulates dw_hat, looping over
    row tiles) or a row tile (dx_hat, looping over class tiles), over its split of the loop side.
    The owned gradient goes to ``own_ptr`` (fp32, [split, own_rows, D], read-modified-written only
    by this program, so no race); with ``atomic_dx`` a class-tile owner also atomically adds its
    share of dx_hat to ``dx_ptr`` (fp32). ``own_columns``, ``atomic_dx``, ``SIM`` and ``loss`` are
    runtime switches (uniform branches, free next to the dots) so that few variants are compiled;
    square
    tiles (BLOCK_M = BLOCK_C * KP) give both owners the same block shapes.
    """
    tl.static_assert(BLOCK_M == BLOCK_C * KP)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    first = split * tiles_per_split
    own_base = own_ptr + split.to(tl.int64) * own_rows * D
    for tile in range(first, tl.minimum(first + tiles_per_split, num_loop_tiles)):
        if own_columns:
            row_tile = tile
            class_tile = first_own_tile + pid
        else:
            row_tile = pid
            class_tile = tile
        rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        cls, prow, proxy_mask = _columns(class_tile, C, K, KP, BLOCK_C)
        s = _similarity_tile(x_ptr, w_ptr, rows, row_mask, prow, proxy_mask, D, stride_x,
                             stride_w, BLOCK_M, BLOCK_C * KP, BLOCK_D, PRECISION)
        s3, S, q = _class_tile(s, inv_gamma, K, SIM, KP, BLOCK_M, BLOCK_C)
        dS = _class_grad(S, cls, rows, labels, row_mask, N, C, terms_ptr, grad_ptr, alpha, delta,
                         loss)
        # Gradient filtering: with threshold 0 every tile passes (bitwise the unfiltered result).
        if tl.max(tl.max(tl.abs(dS), 1), 0) >= filter_threshold:
            ds = tl.reshape(class_similarity_vjp(s3, q, S, dS, inv_gamma, SIM),
                            (BLOCK_M, BLOCK_C * KP))
            # Rounded to the input dtype for the tensor cores (flash-attention does the same);
            # dS is in units of max |g| (g/N or g/|C+| for the mean), O(alpha), so fp16 neither
            # under- nor overflows.
            ds = ds.to(x_ptr.dtype.element_ty)
            x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
            w_rows = w_ptr + prow[:, None] * stride_w
            if own_columns:
                own_index = prow - first_own_tile * BLOCK_C * K
            else:
                own_index = rows.to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                x_mask = row_mask[:, None] & d_mask[None, :]
                w_mask = proxy_mask[:, None] & d_mask[None, :]
                if own_columns:
                    x = tl.load(x_rows + offs_d[None, :], mask=x_mask, other=0.0)
                    own = tl.dot(tl.trans(ds), x, input_precision=PRECISION)
                    own_mask = w_mask
                else:
                    w = tl.load(w_rows + offs_d[None, :], mask=w_mask, other=0.0)
                    own = tl.dot(ds, w, input_precision=PRECISION)
                    own_mask = x_mask
                own_ptrs = own_base + own_index[:, None] * D + offs_d[None, :]
                tl.store(own_ptrs, tl.load(own_ptrs, mask=own_mask, other=0.0) + own,
                         mask=own_mask)
                if atomic_dx:
                    w = tl.load(w_rows + offs_d[None, :], mask=w_mask, other=0.0)
                    tl.atomic_add(dx_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
                                  tl.dot(ds, w, input_precision=PRECISION), mask=x_mask)


# ----------------------------------------------------------------------------------------------
# Host side: specialisations (the one place that picks constexprs), launchers, autograd
# ----------------------------------------------------------------------------------------------

# A class's K proxies live in one tile. The paper uses K <= 16; each doubling of the bound adds 12
# compiled variants (the compile check builds every one for two architectures in CI).
MAX_PROXIES_PER_CLASS = 16
# The register budget a thread of these kernels gets (ptxas's .maxnreg): the hardware's 255. Left
# to itself, ptxas sometimes aims at 128, two blocks of 8 warps per SM, and spills to get there.
MAX_REGISTERS = 255
_FORWARD_ARGS = (
    ("x_ptr", "*S"), ("w_ptr", "*S"), ("labels_ptr", "*i64"), ("part_ptr", "*fp32"),
    ("N", "i32"), ("C", "i32"), ("K", "i32"), ("D", "i32"),
    ("stride_x", "i32"), ("stride_w", "i32"), ("tiles_per_split", "i32"), ("num_tiles", "i32"),
    ("alpha", "fp32"), ("delta", "fp32"), ("inv_gamma", "fp32"), ("SIM", "i32"), ("loss", "i32"),
)
_BACKWARD_ARGS = (
    ("x_ptr", "*S"), ("w_ptr", "*S"), ("labels_ptr", "*i64"), ("terms_ptr", "*fp32"),
    ("grad_ptr", "*fp32"), ("own_ptr", "*fp32"), ("dx_ptr", "*fp32"), ("N", "i32"),
    ("C", "i32"), ("K", "i32"), ("D", "i32"), ("stride_x", "i32"), ("stride_w", "i32"),
    ("first_own_tile", "i32"), ("own_rows", "i32"), ("tiles_per_split", "i32"),
    ("num_loop_tiles", "i32"), ("alpha", "fp32"), ("delta", "fp32"), ("inv_gamma", "fp32"),
    ("SIM", "i32"), ("loss", "i32"), ("filter_threshold", "fp32"), ("own_columns", "i32"),
    ("atomic_dx", "i32"),
)
KINDS = ("forward", "backward")


def _tiles(kind: str, dtype: torch.dtype, precision: str,
           interpret: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, columns, BLOCK_D, warps, stages); the module docstring's "Tiles and registers"
    says why. Under the interpreter, 32-wide tiles: the small test shapes then span several tiles
    and splits, so the masking and the loops are exercised, and it stays quick."""
    if interpret:
        return 32, 32, 32, 4, 3
    if kind == "backward":
        return 64, 64, (32 if dtype != torch.float32 else 16), 8, 3
    if dtype != torch.float32:
        return 128, 64, 32, 8, 3
    if precision == "tf32":
        return 128, 64, 16, 8, 3
    return 64, 64, 16, 8, 1


def specialisation(kind: str, loss: str, proxies_per_class: int, dtype: torch.dtype,
                   allow_tf32: bool = False, interpret: bool | None = None) -> Specialisation:
    """The kernel variant of ``kind`` (see :data:`KINDS`) for these inputs: the launchers launch
    it, and :mod:`mpa_kernels.kernels.compile_check` compiles each one of
    :data:`SPECIALISATIONS`."""
    if proxies_per_class > MAX_PROXIES_PER_CLASS:
        raise ValueError(
            f"the triton-linear backend supports up to {MAX_PROXIES_PER_CLASS} proxies per "
            f"class, got {proxies_per_class}; use backend='torch' or 'reference'"
        )
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"the triton-linear kernels take fp32, fp16 or bf16 inputs, got {dtype}")
    interpret = triton_interpreting() if interpret is None else interpret
    kp = triton.next_power_of_2(proxies_per_class)
    precision = "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"
    block_m, columns, block_d, warps, stages = _tiles(kind, dtype, precision, interpret)
    code = LOSS_CODES[loss]
    constexprs = (("KP", kp),)
    if kind == "forward":
        kernel = _column_forward_kernel if code == LOSS_MPA.value else _row_forward_kernel
        args = _FORWARD_ARGS
    else:
        kernel, args = _backward_kernel, _BACKWARD_ARGS
    constexprs += (("BLOCK_M", block_m), ("BLOCK_C", max(1, columns // kp)),
                   ("BLOCK_D", block_d), ("PRECISION", precision))
    name = f"{kernel.__name__}[KP={kp},{TRITON_DTYPES[dtype]},{precision}]"
    arg_types = tuple((arg, t.replace("S", TRITON_DTYPES[dtype])) for arg, t in args)
    return Specialisation(name, kernel, arg_types, constexprs, warps, stages, MAX_REGISTERS)


def _enumerate_specialisations() -> tuple:
    """Every GPU specialisation the launchers can produce (what the compile check builds), the
    merge of the split partials (:mod:`.launch`) included."""
    out = {sp.name: sp for sp in MERGE_SPECIALISATIONS}
    k_values = [1 << i for i in range(MAX_PROXIES_PER_CLASS.bit_length())]
    for dtype in TRITON_DTYPES:
        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            for loss in ("mpa_dw", "mpa"):  # one loss of each family: the code is a runtime switch
                for kind in KINDS:
                    for k in k_values:
                        sp = specialisation(kind, loss, k, dtype, tf32, interpret=False)
                        out[sp.name] = sp
    return tuple(out.values())


SPECIALISATIONS = _enumerate_specialisations()


@dataclass(frozen=True)
class Options:
    """The knobs of :func:`fused_linear_terms`, resolved (no ``None`` left)."""

    deterministic: bool
    filter_eps: float
    allow_tf32: bool


def _blocks(sp: Specialisation) -> tuple[int, int]:
    constexprs = dict(sp.constexprs)
    return constexprs["BLOCK_M"], constexprs["BLOCK_C"]


def _column_wise(spec: LossSpec) -> bool:
    return LOSS_CODES[spec.loss] == LOSS_MPA.value


def fused_linear_forward(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, spec: LossSpec,
                         options: Options) -> torch.Tensor:
    """The terms of the backends' contract (:mod:`mpa_kernels.backends`), fp32: ``(2, N)``
    (``lse``, ``extra``) row-wise, ``(2, C)`` (``P``, ``N``) column-wise. ``labels`` may lie
    outside ``[0, C)`` (no positive class). Two launches: the forward and the merge of its
    split partials."""
    n, d = x.shape
    c, k = spec.num_classes, spec.proxies_per_class
    sp = specialisation("forward", spec.loss, k, x.dtype, options.allow_tf32)
    block_m, block_c = _blocks(sp)
    row_tiles, class_tiles = triton.cdiv(n, block_m), triton.cdiv(c, block_c)
    column_wise = _column_wise(spec)
    own, loop, length = (class_tiles, row_tiles, c) if column_wise else (row_tiles, class_tiles, n)
    splits, per_split = plan_splits(own, loop, x.device,
                                    max(1, SPLIT_SCRATCH_BYTES // (8 * length)))
    part = torch.empty(2, splits, length, dtype=torch.float32, device=x.device)
    sp.launch((own, splits), x, w, labels, part, n, c, k, d, x.stride(0), w.stride(0), per_split,
              loop, spec.alpha, spec.delta, 1.0 / spec.gamma, SIMILARITY_CODES[spec.similarity],
              LOSS_CODES[spec.loss])
    return merge_splits(part, column_wise)


def _launch_backward(own_columns, x, w, labels, terms, grad, spec, options, own_tiles,
                     first_own_tile, own_rows, atomic_dx, max_bytes):
    """One launch of :func:`_backward_kernel` owning ``own_tiles`` class tiles (``own_columns``)
    or row tiles from ``first_own_tile``; returns the owned gradient in kernel units (fp32,
    splits summed in a fixed order)."""
    n, d = x.shape
    c, k = spec.num_classes, spec.proxies_per_class
    sp = specialisation("backward", spec.loss, k, x.dtype, options.allow_tf32)
    block_m, block_c = _blocks(sp)
    num_loop = triton.cdiv(n, block_m) if own_columns else triton.cdiv(c, block_c)
    splits, per_split = plan_splits(own_tiles, num_loop, x.device,
                                    max(1, max_bytes // (4 * d * own_rows)))
    own = torch.zeros(splits, own_rows, d, dtype=torch.float32, device=x.device)
    sp.launch((own_tiles, splits), x, w, labels, terms, grad, own,
              own if atomic_dx is None else atomic_dx, n, c, k, d, x.stride(0), w.stride(0),
              first_own_tile, own_rows, per_split, num_loop, spec.alpha, spec.delta,
              1.0 / spec.gamma, SIMILARITY_CODES[spec.similarity], LOSS_CODES[spec.loss],
              options.filter_eps * spec.alpha, int(own_columns), int(atomic_dx is not None))
    return own[0] if splits == 1 else own.sum(0)


def fused_linear_backward(grad, x, w, labels, terms, spec: LossSpec, options: Options):
    """dx_hat and dw_hat (in the inputs' dtypes) from the gradient ``grad`` of the terms (their
    shape) and the terms.

    The kernels see ``grad / unit`` with ``unit = max |grad|`` (g/N or g/|C+| for the mean) and
    the owned gradients are multiplied by ``unit`` at the end, so that the class-level gradients
    rounded to fp16/bf16 for the gradient products are O(alpha), and ``filter_eps`` is relative
    to the largest coefficient. Default: one launch owns class tiles (dw_hat) and atomically adds
    dx_hat. Deterministic: a launch owning row tiles (dx_hat) and one owning class tiles
    (dw_hat), no atomics. dw_hat is produced in chunks of whole class tiles, each accumulated in
    fp32 and cast at once, so the fp32 scratch stays under ``DW_SCRATCH_BYTES`` whatever C is."""
    n, d = x.shape
    c, k = spec.num_classes, spec.proxies_per_class
    grad = grad.to(torch.float32)
    unit = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    grad = (grad / unit).contiguous()
    block_m, block_c = _blocks(specialisation("backward", spec.loss, k, x.dtype))
    if options.deterministic:
        dx32 = _launch_backward(False, x, w, labels, terms, grad, spec, options,
                                triton.cdiv(n, block_m), 0, n, None, SPLIT_SCRATCH_BYTES)
        atomic_dx = None
    else:
        dx32 = atomic_dx = torch.zeros(n, d, dtype=torch.float32, device=x.device)
    dw = torch.empty_like(w)
    class_tiles = triton.cdiv(c, block_c)
    tile_rows = block_c * k
    chunk_tiles = max(1, DW_SCRATCH_BYTES // (4 * d * tile_rows))
    for first in range(0, class_tiles, chunk_tiles):
        tiles = min(chunk_tiles, class_tiles - first)
        rows = min(tiles * tile_rows, c * k - first * tile_rows)
        part = _launch_backward(True, x, w, labels, terms, grad, spec, options, tiles, first,
                                rows, atomic_dx, DW_SCRATCH_BYTES)
        dw[first * tile_rows:first * tile_rows + rows] = (part * unit).to(w.dtype)
    return (dx32 * unit).to(x.dtype), dw


# torch.library custom operators: torch.compile records them as single nodes (no graph break), and
# autograd goes through register_autograd (what a thin autograd.Function would do). The LossSpec
# and the options travel as plain scalars, which is what an operator schema takes.

@torch.library.custom_op("mpa_kernels::linear_terms", mutates_args=())
def _linear_terms_op(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, loss: str,
                     num_classes: int, proxies_per_class: int, similarity: str, alpha: float,
                     delta: float, gamma: float, deterministic: bool, filter_eps: float,
                     allow_tf32: bool) -> torch.Tensor:
    # A shard: the caller checked the whole loss; a class-parallel rank may own a single class.
    spec = LossSpec(loss, num_classes, proxies_per_class, alpha, delta, gamma, similarity,
                    shard=True)
    return fused_linear_forward(x, w, labels, spec, Options(deterministic, filter_eps, allow_tf32))


@_linear_terms_op.register_fake
def _(x, w, labels, loss, num_classes, proxies_per_class, similarity, alpha, delta, gamma,
      deterministic, filter_eps, allow_tf32):
    length = num_classes if LOSS_CODES[loss] == LOSS_MPA.value else x.shape[0]
    return x.new_empty((2, length), dtype=torch.float32)


@torch.library.custom_op("mpa_kernels::linear_terms_backward", mutates_args=())
def _linear_terms_backward_op(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                              labels: torch.Tensor, terms: torch.Tensor, loss: str,
                              num_classes: int, proxies_per_class: int, similarity: str,
                              alpha: float, delta: float, gamma: float, deterministic: bool,
                              filter_eps: float,
                              allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # A shard: the caller checked the whole loss; a class-parallel rank may own a single class.
    spec = LossSpec(loss, num_classes, proxies_per_class, alpha, delta, gamma, similarity,
                    shard=True)
    return fused_linear_backward(grad, x, w, labels, terms, spec,
                                 Options(deterministic, filter_eps, allow_tf32))


@_linear_terms_backward_op.register_fake
def _(grad, x, w, labels, terms, *hyper):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, labels, *hyper = inputs
    ctx.save_for_backward(x, w, labels, output)
    ctx.hyper = hyper


def _backward(ctx, grad):
    dx, dw = _linear_terms_backward_op(grad, *ctx.saved_tensors, *ctx.hyper)
    return (dx, dw) + (None,) * (1 + len(ctx.hyper))


_linear_terms_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_terms(x_hat: torch.Tensor, w_hat: torch.Tensor, labels: torch.Tensor,
                       spec: LossSpec, *, deterministic: bool | None = None,
                       filter_eps: float = 0.0, allow_tf32: bool | None = None) -> torch.Tensor:
    """The fp32 terms (see :func:`fused_linear_forward`) of ``spec.loss`` from normalised
    ``x_hat`` (N, d) and ``w_hat`` (C*K, d), differentiable in both.

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
    if x_hat.dtype not in TRITON_DTYPES:
        # fp64 is computed in fp32 (Triton's dot has no fp64 path; fp64 is for checking).
        x_hat, w_hat = x_hat.float(), w_hat.float()
    elif w_hat.dtype != x_hat.dtype:
        w_hat = w_hat.to(x_hat.dtype)
    return _linear_terms_op(
        x_hat.contiguous(), w_hat.contiguous(), labels.long().contiguous(), spec.loss,
        spec.num_classes, spec.proxies_per_class, spec.similarity, spec.alpha, spec.delta,
        spec.gamma, options.deterministic, options.filter_eps, options.allow_tf32)
