"""Loss kernels over the similarity tensor ``s = x_hat @ w_hat.T`` (N x C*K), one forward and one
backward pass for every loss.

The GEMMs stay with torch (cuBLAS); these kernels do everything between them. ``s`` is read once by
the forward pass, which writes only per-row or per-class log-sum-exps (and the loss), and once more
by the backward pass, which writes ``ds`` once. The intra-class reduction over the K proxies,
margins, ``alpha`` and the log-sum-exps stay in registers, in fp32 whatever the input dtype.

Kernels follow the two families of GUIDE.md:

* ``_row_forward_kernel`` (MPA-DW, MPA-AP, SoftTriple, ProxyNCA): a program owns ``BLOCK_N`` rows
  and sweeps a range of classes with an online log-sum-exp per row;
* ``_column_forward_kernel`` (MPA, ProxyAnchor): a program owns ``BLOCK_C`` classes and sweeps a
  range of rows with two online log-sum-exps per class (positives, negatives);
* ``_backward_kernel`` (both): every tile is independent once the log-sum-exps are known, so the
  grid covers ``s`` and each program turns one tile of ``s`` into one tile of ``ds``.

Forward programs split the swept dimension into ``splits`` ranges when the owned dimension alone
would leave the GPU idle (N = 256 rows are 16 programs); each writes a partial log-sum-exp, and
``_finalize_kernel`` (one program) merges the ``splits x N`` (or ``splits x C``) partials into the
statistics and the loss. A forward is two launches, a backward one.

Layout: :func:`similarity_loss_forward` / :func:`similarity_loss_backward` are the host launchers;
:func:`specialisation` is the single place that picks a kernel's constexprs and warps, used by the
launchers and by :mod:`mpa_kernels.kernels.compile_check`, which enumerates :data:`SPECIALISATIONS`.
The autograd wrapper is a pair of ``torch.library`` custom operators (:func:`similarity_loss`) so
that ``torch.compile`` sees one opaque node, not a graph break.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
)

__all__ = [
    "MAX_PROXIES_PER_CLASS",
    "SPECIALISATIONS",
    "Specialisation",
    "similarity_loss",
    "similarity_loss_backward",
    "similarity_loss_forward",
    "specialisation",
]

# Tiles hold BLOCK_N rows x TILE_COLUMNS padded proxy columns (BLOCK_C classes x K_PAD proxies):
# 2048 values, 8 per thread with 8 warps. More per thread buys little for a memory-bound pass and
# costs compile time (LLVM time grows with the unrolled per-thread code). With the temporaries of
# the softmax over K and of the log-sum-exps that is 100-130 registers a thread, no stack, for
# every variant (compile_check --resources).
BLOCK_N = 16
TILE_COLUMNS = 128
NUM_WARPS = 8
# A class's K proxies live in one tile, and every power of two up to this is a compiled variant
# (x 3 dtypes x 2 architectures in CI); the paper uses K <= 16.
MAX_PROXIES_PER_CLASS = 32


@triton.jit
def _logit_tile(s_ptr, labels, rows, cls, N, C, K, alpha, delta, inv_gamma,
                sim, LOSS: tl.constexpr, K_PAD: tl.constexpr):
    """Load the ``[rows, cls, K_PAD]`` tile of ``s`` and take it to logits.

    Returns the fp32 tile, its offsets and 3-D mask (for storing ``ds`` at the same place), the
    class-similarity weights ``q``, ``S``, the logits ``z`` with their sign, the positive mask and
    the 2-D mask of real ``(row, class)`` pairs.
    """
    k = tl.arange(0, K_PAD)[None, None, :]
    k_valid = k < K
    pair_ok = (rows < N)[:, None] & (cls < C)[None, :]
    mask = pair_ok[:, :, None] & k_valid
    # int64 row offsets: N * C * K passes 2^31 at SOP-like shapes with N = 8192 or C = 100k.
    offs = rows.to(tl.int64)[:, None, None] * (C * K) + (cls * K)[None, :, None] + k
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    S, q = class_similarity(s, k_valid, inv_gamma, K, sim)
    is_pos = labels[:, None] == cls[None, :]
    z, sign = loss_logits(S, is_pos, alpha, delta, LOSS)
    return s, offs, mask, q, S, z, sign, is_pos, pair_ok


@triton.jit
def _row_forward_kernel(s_ptr, labels_ptr, part_ptr, N, C, K, blocks_per_split,
                        alpha, delta, inv_gamma, sim,
                        LOSS: tl.constexpr, K_PAD: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row-wise family: per row ``i`` and class range of this split, a partial log-sum-exp of the
    logits that enter row ``i``'s LSE and the partial sum of its positive-pair term.

    ``part`` is ``[2, splits, N]`` fp32: ``[0]`` the partial LSE (no zero logit; the host adds it
    once), ``[1]`` the positive term: ``softplus(z_iy)`` for MPA-DW (its positive is outside the
    LSE), ``-z_iy`` for SoftTriple's cross-entropy, 0 for MPA-AP (its positive is inside).
    """
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    labels = tl.load(labels_ptr + rows, mask=rows < N, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    positive = tl.zeros([BLOCK_N], tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(C, BLOCK_C))
    for block in range(first, last):
        cls = block * BLOCK_C + tl.arange(0, BLOCK_C)
        s, offs, mask, q, S, z, sign, is_pos, pair_ok = _logit_tile(
            s_ptr, labels, rows, cls, N, C, K, alpha, delta, inv_gamma, sim, LOSS, K_PAD)
        if LOSS == LOSS_MPA_DW:
            m, l = online_lse_update(m, l, z, pair_ok & ~is_pos, 1)
            # A row has one positive class in the whole sweep: pick its logit out of the tile,
            # then one softplus per row, not one per tile element (which also kept the tile's
            # softplus live beside the LSE's exponentials, past the register budget).
            hit = pair_ok & is_pos
            z_pos = tl.sum(tl.where(hit, z, 0.0), axis=1)
            positive += tl.where(tl.max(hit.to(tl.int32), axis=1) > 0, softplus(z_pos), 0.0)
        else:
            m, l = online_lse_update(m, l, z, pair_ok, 1)
            if LOSS == LOSS_SOFT_TRIPLE:
                positive -= tl.sum(tl.where(pair_ok & is_pos, z, 0.0), axis=1)
    out = part_ptr + split * N + rows
    tl.store(out, lse_finalize(m, l), mask=rows < N)
    tl.store(out + splits * N, positive, mask=rows < N)


@triton.jit
def _column_forward_kernel(s_ptr, labels_ptr, part_ptr, N, C, K, blocks_per_split,
                           alpha, delta, inv_gamma, sim,
                           LOSS: tl.constexpr, K_PAD: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Column-wise family: per class ``c`` and row range of this split, the partial log-sum-exps
    of ``P_c`` (over positives, logits ``-alpha (S - delta)``) and ``N_c`` (over negatives, logits
    ``alpha (S + delta)``), eq. 6.

    ``part`` is ``[2, splits, C]`` fp32: ``[0]`` for ``P``, ``[1]`` for ``N``, without the zero
    logit (the host adds it once).
    """
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    cls = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_pos = tl.full([BLOCK_C], float("-inf"), tl.float32)
    l_pos = tl.zeros([BLOCK_C], tl.float32)
    m_neg = tl.full([BLOCK_C], float("-inf"), tl.float32)
    l_neg = tl.zeros([BLOCK_C], tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK_N))
    for block in range(first, last):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        labels = tl.load(labels_ptr + rows, mask=rows < N, other=-1)
        s, offs, mask, q, S, z, sign, is_pos, pair_ok = _logit_tile(
            s_ptr, labels, rows, cls, N, C, K, alpha, delta, inv_gamma, sim, LOSS, K_PAD)
        m_pos, l_pos = online_lse_update(m_pos, l_pos, z, pair_ok & is_pos, 0)
        m_neg, l_neg = online_lse_update(m_neg, l_neg, z, pair_ok & ~is_pos, 0)
    out = part_ptr + split * C + cls
    tl.store(out, lse_finalize(m_pos, l_pos), mask=cls < C)
    tl.store(out + splits * C, lse_finalize(m_neg, l_neg), mask=cls < C)


@triton.jit
def _merge_splits(part_ptr, idx, ok, M, splits):
    """Log-sum-exp over the ``splits`` partials ``part[s, idx]`` (each ``[splits, M]``)."""
    m = tl.full(idx.shape, float("-inf"), tl.float32)
    l = tl.zeros(idx.shape, tl.float32)
    for split in range(0, splits):
        x = tl.load(part_ptr + split * M + idx, mask=ok, other=float("-inf"))
        m, l = online_lse_update(m, l, x[None, :], ok[None, :], 0)
    return lse_finalize(m, l)


@triton.jit
def _finalize_kernel(part_ptr, stats_ptr, weights_ptr, loss_ptr, M, splits, N, C,
                     LOSS: tl.constexpr, BLOCK: tl.constexpr):
    """One program: merge the forward's ``[2, splits, M]`` partials (M = N rows or C classes) into
    the log-sum-exps the backward needs (``stats``, the zero logit added where the loss has one),
    the weights of positive and negative groups, and the loss. One launch instead of a dozen small
    torch ops, which would cost more than the pass over s at N = 256.

    A class is in C+ exactly when its merged positive LSE (before the zero logit) is finite.
    """
    total_pos = tl.zeros([BLOCK], tl.float32)
    total_neg = tl.zeros([BLOCK], tl.float32)
    present = tl.zeros([BLOCK], tl.float32)
    for start in range(0, M, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < M
        first = _merge_splits(part_ptr, idx, ok, M, splits)
        if LOSS == LOSS_MPA:
            second = softplus(_merge_splits(part_ptr + splits * M, idx, ok, M, splits))
            present += tl.where(ok & (first > float("-inf")), 1.0, 0.0)
            first = softplus(first)
            tl.store(stats_ptr + M + idx, second, mask=ok)
            total_neg += tl.where(ok, second, 0.0)
            total_pos += tl.where(ok, first, 0.0)
        else:
            if LOSS != LOSS_SOFT_TRIPLE:
                first = softplus(first)
            positive = tl.zeros([BLOCK], tl.float32)
            for split in range(0, splits):
                positive += tl.load(part_ptr + (splits + split) * M + idx, mask=ok, other=0.0)
            total_pos += tl.where(ok, first + positive, 0.0)
        tl.store(stats_ptr + idx, first, mask=ok)
    if LOSS == LOSS_MPA:
        w_pos = 1.0 / tl.sum(present, axis=0)
        w_neg = 1.0 / C
        tl.store(loss_ptr, tl.sum(total_pos, axis=0) * w_pos + tl.sum(total_neg, axis=0) * w_neg)
    else:
        w_pos = 1.0 / N
        w_neg = w_pos
        tl.store(loss_ptr, tl.sum(total_pos, axis=0) * w_pos)
    tl.store(weights_ptr, w_pos)
    tl.store(weights_ptr + 1, w_neg)


# Gradient. Every loss is a weighted sum of log-sum-exps G over groups of logits z (with or without
# a zero logit), and dG/dz_j = e^(z_j - G) for a member j. The group of pair (i, c) and the weight:
#   MPA-AP       row i (zero logit)                                    weight 1/N
#   MPA-DW       row i's negatives (zero logit); the positive alone,   weight 1/N
#                softplus(z_iy) = log(1 + e^z_iy), so e^(z - G) = sigmoid(z_iy)
#   SoftTriple   row i (no zero logit), minus z_iy: an extra -1 at the positive, weight 1/N
#   MPA          P_c (positives of class c) with weight 1/|C+|, N_c (negatives) with weight 1/C
# so dL/dz_ic = grad * weight * (e^(z_ic - G) - [SoftTriple and c = y_i]), then
# dL/dS_ic = alpha * sign_ic * dL/dz_ic (common.loss_logits) and ds = dS/ds * dL/dS
# (common.class_similarity_vjp). `stats` holds G: per row [N] or per class [2, C] (P, then N);
# `weights` the weights of positive and negative groups; `grad` is the upstream scalar.
@triton.jit
def _backward_kernel(s_ptr, ds_ptr, labels_ptr, stats_ptr, weights_ptr, grad_ptr, N, C, K,
                     alpha, delta, inv_gamma, sim,
                     LOSS: tl.constexpr, K_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # Class blocks on grid axis 0 (up to 2^31 - 1; axis 1 stops at 65535): C = 1M classes at K = 32
    # are 250k blocks. Neighbouring programs then read neighbouring columns of the same rows.
    cls = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    labels = tl.load(labels_ptr + rows, mask=rows < N, other=-1)
    s, offs, mask, q, S, z, sign, is_pos, pair_ok = _logit_tile(
        s_ptr, labels, rows, cls, N, C, K, alpha, delta, inv_gamma, sim, LOSS, K_PAD)
    grad = tl.load(grad_ptr)
    coef = tl.where(is_pos, grad * tl.load(weights_ptr), grad * tl.load(weights_ptr + 1))
    if LOSS == LOSS_MPA:
        lse_pos = tl.load(stats_ptr + cls, mask=cls < C, other=0.0)
        lse_neg = tl.load(stats_ptr + C + cls, mask=cls < C, other=0.0)
        group = tl.where(is_pos, lse_pos[None, :], lse_neg[None, :])
    else:
        group = tl.load(stats_ptr + rows, mask=rows < N, other=0.0)[:, None]
        if LOSS == LOSS_MPA_DW:
            group = tl.where(is_pos, softplus(z), group)
    dz = tl.exp(z - group)
    if LOSS == LOSS_SOFT_TRIPLE:
        dz = tl.where(is_pos, dz - 1.0, dz)
    dS = tl.where(pair_ok, coef * alpha * sign * dz, 0.0)
    ds = class_similarity_vjp(s, q, S, dS, inv_gamma, sim)
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Specialisations: the one place that maps (kernel, loss, K, dtype) to constexprs.

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Runtime arguments of each kernel, in order, with their Triton types; "S" is s's element type.
_FORWARD_ARGS = (("s_ptr", "*S"), ("labels_ptr", "*i64"), ("part_ptr", "*fp32"), ("N", "i32"),
                 ("C", "i32"), ("K", "i32"), ("blocks_per_split", "i32"), ("alpha", "fp32"),
                 ("delta", "fp32"), ("inv_gamma", "fp32"), ("sim", "i32"))
_BACKWARD_ARGS = (("s_ptr", "*S"), ("ds_ptr", "*S"), ("labels_ptr", "*i64"),
                  ("stats_ptr", "*fp32"), ("weights_ptr", "*fp32"), ("grad_ptr", "*fp32"),
                  ("N", "i32"), ("C", "i32"), ("K", "i32"), ("alpha", "fp32"), ("delta", "fp32"),
                  ("inv_gamma", "fp32"), ("sim", "i32"))
_FINALIZE_ARGS = (("part_ptr", "*fp32"), ("stats_ptr", "*fp32"), ("weights_ptr", "*fp32"),
                  ("loss_ptr", "*fp32"), ("M", "i32"), ("splits", "i32"), ("N", "i32"),
                  ("C", "i32"))
_KERNELS = {
    "row_forward": (_row_forward_kernel, _FORWARD_ARGS),
    "column_forward": (_column_forward_kernel, _FORWARD_ARGS),
    "backward": (_backward_kernel, _BACKWARD_ARGS),
}
FINALIZE_BLOCK = 1024


@dataclass(frozen=True)
class Specialisation:
    """One compiled variant of a kernel: what the launcher launches and the compile check builds."""

    name: str
    kernel: object  # triton.JITFunction
    arg_types: tuple  # ((name, triton type), ...) of the runtime arguments, in order
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int = 3  # software-pipelining depth of the loops over tl.dot (Triton's default)

    def signature(self) -> dict:
        """Triton's signature dict: runtime argument types, then ``"constexpr"`` for the rest."""
        sig = dict(self.arg_types)
        sig.update({name: "constexpr" for name, _ in self.constexprs})
        return sig

    def options(self) -> tuple:
        """The compile options besides the constexprs, as ``(name, value)`` pairs."""
        return ("num_warps", self.num_warps), ("num_stages", self.num_stages)

    def launch(self, grid, *args) -> None:
        """Launch on the device of the tensor arguments (Triton launches on the current one)."""
        if len(args) != len(self.arg_types):
            raise TypeError(
                f"{self.name}: expected {len(self.arg_types)} arguments, got {len(args)}")
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.kernel[grid](*args, **dict(self.constexprs), **dict(self.options()))


def _k_pad(proxies_per_class: int) -> int:
    return triton.next_power_of_2(proxies_per_class)


def specialisation(kind: str, loss: str, proxies_per_class: int,
                   dtype: torch.dtype) -> Specialisation:
    """The kernel variant that computes ``loss`` for these inputs; ``kind`` is ``"forward"``,
    ``"finalize"`` (which merges the forward's partials; fp32 whatever ``dtype``) or
    ``"backward"``. The similarity mode is a runtime argument, not part of the variant."""
    if kind == "finalize":
        name = f"{_finalize_kernel.__name__}[LOSS={LOSS_CODES[loss]}]"
        return Specialisation(name, _finalize_kernel, _FINALIZE_ARGS,
                              (("LOSS", LOSS_CODES[loss]), ("BLOCK", FINALIZE_BLOCK)), 4)
    if proxies_per_class > MAX_PROXIES_PER_CLASS:
        raise ValueError(
            f"the triton backend supports up to {MAX_PROXIES_PER_CLASS} proxies per class, got "
            f"{proxies_per_class}; use backend='torch' or 'reference'"
        )
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"the triton kernels take fp32, fp16 or bf16 similarities, got {dtype}")
    if kind == "forward":
        kind = "column_forward" if LOSS_CODES[loss] == LOSS_MPA.value else "row_forward"
    kernel, args = _KERNELS[kind]
    k_pad = triton.next_power_of_2(proxies_per_class)
    constexprs = (("LOSS", LOSS_CODES[loss]), ("K_PAD", k_pad), ("BLOCK_N", BLOCK_N),
                  ("BLOCK_C", max(1, TILE_COLUMNS // k_pad)))
    arg_types = tuple((name, t.replace("S", _TRITON_DTYPES[dtype])) for name, t in args)
    name = f"{kernel.__name__}[LOSS={LOSS_CODES[loss]},K_PAD={k_pad},{_TRITON_DTYPES[dtype]}]"
    return Specialisation(name, kernel, arg_types, constexprs, NUM_WARPS)


def _enumerate_specialisations() -> tuple:
    """Every specialisation the launchers can produce, for the compile check."""
    out = {}
    for dtype in _TRITON_DTYPES:
        for loss in LOSS_CODES:
            for kind in ("forward", "finalize", "backward"):
                for k in range(1, MAX_PROXIES_PER_CLASS + 1):
                    spec = specialisation(kind, loss, k, dtype)
                    out[spec.name] = spec
    return tuple(out.values())


SPECIALISATIONS = _enumerate_specialisations()


# --------------------------------------------------------------------------------------------
# Host launchers.

def _forward_splits(owned_blocks: int, swept_blocks: int, device: torch.device) -> tuple[int, int]:
    """``(splits, blocks_per_split)``: enough programs to fill the device (4 per SM), each sweeping
    at least one block. Under the interpreter a handful, so that the tests cross split borders."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    splits = max(1, min(swept_blocks, target // max(owned_blocks, 1)))
    per_split = triton.cdiv(swept_blocks, splits)
    return triton.cdiv(swept_blocks, per_split), per_split


def similarity_loss_forward(s: torch.Tensor, labels: torch.Tensor, loss: str, num_classes: int,
                            proxies_per_class: int, similarity: str, alpha: float, delta: float,
                            gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward pass over ``s`` (N, C*K), contiguous, fp32/fp16/bf16; ``labels`` int64 (N,).

    Returns ``(loss, stats, weights)``, all fp32: the scalar loss; the log-sum-exps the backward
    pass needs (per row ``[N]``, or ``[2, C]`` for MPA: ``P`` then ``N``, zero logit included);
    the weights of positive and negative groups in the loss (``[1/N, 1/N]`` or
    ``[1/|C+|, 1/C]``).
    """
    n, c, k = s.shape[0], num_classes, proxies_per_class
    spec = specialisation("forward", loss, k, s.dtype)
    block_c = dict(spec.constexprs)["BLOCK_C"]
    row_blocks, class_blocks = triton.cdiv(n, BLOCK_N), triton.cdiv(c, block_c)
    column_wise = LOSS_CODES[loss] == LOSS_MPA.value
    owned, swept = (class_blocks, row_blocks) if column_wise else (row_blocks, class_blocks)
    splits, per_split = _forward_splits(owned, swept, s.device)
    m = c if column_wise else n
    part = torch.empty((2, splits, m), device=s.device, dtype=torch.float32)
    spec.launch((owned, splits), s, labels, part, n, c, k, per_split, alpha, delta, 1.0 / gamma,
                SIMILARITY_CODES[similarity])
    stats = torch.empty((2, c) if column_wise else (n,), device=s.device, dtype=torch.float32)
    weights = torch.empty(2, device=s.device, dtype=torch.float32)
    value = torch.empty((), device=s.device, dtype=torch.float32)
    specialisation("finalize", loss, k, s.dtype).launch(
        (1,), part, stats, weights, value, m, splits, n, c)
    return value, stats, weights


def similarity_loss_backward(grad: torch.Tensor, s: torch.Tensor, labels: torch.Tensor,
                             stats: torch.Tensor, weights: torch.Tensor, loss: str,
                             num_classes: int, proxies_per_class: int, similarity: str,
                             alpha: float, delta: float, gamma: float) -> torch.Tensor:
    """``ds`` (the dtype and shape of ``s``) from the upstream scalar gradient ``grad`` and the
    forward pass's ``stats`` and ``weights``."""
    n, c, k = s.shape[0], num_classes, proxies_per_class
    spec = specialisation("backward", loss, k, s.dtype)
    block_c = dict(spec.constexprs)["BLOCK_C"]
    ds = torch.empty_like(s)
    grid = (triton.cdiv(c, block_c), triton.cdiv(n, BLOCK_N))
    spec.launch(grid, s, ds, labels, stats, weights, grad.float(), n, c, k, alpha, delta,
                1.0 / gamma, SIMILARITY_CODES[similarity])
    return ds


# --------------------------------------------------------------------------------------------
# torch.library custom operators: torch.compile records them as single nodes (no graph break) and
# autograd goes through register_autograd, which is what a thin autograd.Function would do.

@torch.library.custom_op("mpa_kernels::similarity_loss", mutates_args=())
def _similarity_loss_op(s: torch.Tensor, labels: torch.Tensor, loss: str, num_classes: int,
                        proxies_per_class: int, similarity: str, alpha: float, delta: float,
                        gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return similarity_loss_forward(s, labels, loss, num_classes, proxies_per_class, similarity,
                                   alpha, delta, gamma)


@_similarity_loss_op.register_fake
def _(s, labels, loss, num_classes, proxies_per_class, similarity, alpha, delta, gamma):
    stats_shape = (2, num_classes) if LOSS_CODES[loss] == LOSS_MPA.value else (s.shape[0],)
    return (s.new_empty((), dtype=torch.float32), s.new_empty(stats_shape, dtype=torch.float32),
            s.new_empty((2,), dtype=torch.float32))


@torch.library.custom_op("mpa_kernels::similarity_loss_backward", mutates_args=())
def _similarity_loss_backward_op(grad: torch.Tensor, s: torch.Tensor, labels: torch.Tensor,
                                 stats: torch.Tensor, weights: torch.Tensor, loss: str,
                                 num_classes: int, proxies_per_class: int, similarity: str,
                                 alpha: float, delta: float, gamma: float) -> torch.Tensor:
    return similarity_loss_backward(grad, s, labels, stats, weights, loss, num_classes,
                                    proxies_per_class, similarity, alpha, delta, gamma)


@_similarity_loss_backward_op.register_fake
def _(grad, s, labels, stats, weights, loss, num_classes, proxies_per_class, similarity, alpha,
      delta, gamma):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, labels, *hyper = inputs
    _, stats, weights = output
    ctx.save_for_backward(s, labels, stats, weights)
    ctx.hyper = hyper
    ctx.mark_non_differentiable(stats, weights)


def _backward(ctx, grad, _grad_stats, _grad_weights):
    s, labels, stats, weights = ctx.saved_tensors
    ds = _similarity_loss_backward_op(grad, s, labels, stats, weights, *ctx.hyper)
    return (ds,) + (None,) * (1 + len(ctx.hyper))


_similarity_loss_op.register_autograd(_backward, setup_context=_setup_context)


def similarity_loss(s: torch.Tensor, labels: torch.Tensor, loss: str, num_classes: int,
                    proxies_per_class: int, similarity: str, alpha: float, delta: float,
                    gamma: float) -> torch.Tensor:
    """The scalar (fp32) similarity loss from ``s`` (N, C*K), differentiable in ``s``."""
    value, _, _ = _similarity_loss_op(s.contiguous(), labels.contiguous(), loss, num_classes,
                                      proxies_per_class, similarity, float(alpha), float(delta),
                                      float(gamma))
    return value
