"""Loss kernels over the similarity tensor ``s = x_hat @ w_hat.T`` (N x C*K), one forward and one
backward pass for every loss.

The GEMMs stay with torch (cuBLAS); these kernels do everything between them. ``s`` is read once by
the forward pass, which writes only the per-row or per-class terms of the backends' contract
(:mod:`mpa_kernels.backends`; the front end reduces them to the loss), and once more by the
backward pass, which takes the terms' gradient and writes ``ds`` once. The intra-class reduction
over the K proxies, margins, ``alpha`` and the log-sum-exps stay in registers, in fp32 whatever
the input dtype.

Kernels follow the losses' two families (one log-sum-exp per sample, or two per class):

* ``_row_forward_kernel`` (MPA-DW, MPA-AP, SoftTriple, ProxyNCA): a program owns ``BLOCK_N`` rows
  and sweeps a range of classes with an online log-sum-exp per row;
* ``_column_forward_kernel`` (MPA, ProxyAnchor): a program owns ``BLOCK_C`` classes and sweeps a
  range of rows with two online log-sum-exps per class (positives, negatives);
* ``_backward_kernel`` (both): every tile is independent once the log-sum-exps are known, so the
  grid covers ``s`` and each program turns one tile of ``s`` into one tile of ``ds``.

Forward programs split the swept dimension into ``splits`` ranges when the owned dimension alone
would leave the GPU idle (N = 256 rows are 16 programs); each writes partials, and the merge kernel
of :mod:`.launch` (shared with the fused-linear kernels) turns the ``splits x N`` (or
``splits x C``) partials into the terms. A forward is two launches, a backward one.

Layout: :func:`similarity_terms_forward` / :func:`similarity_terms_backward` are the host
launchers; :func:`specialisation` is the single place that picks a kernel's constexprs and warps,
used by the launchers and by :mod:`mpa_kernels.kernels.compile_check`, which enumerates
:data:`SPECIALISATIONS`. The autograd wrapper is a pair of ``torch.library`` custom operators
(:func:`similarity_terms`) so that ``torch.compile`` sees one opaque node, not a graph break.
"""

from __future__ import annotations

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
    terms_vjp,
)
from mpa_kernels.kernels.launch import (
    TRITON_DTYPES,
    Specialisation,
    merge_specialisation,
    merge_splits,
    plan_splits,
)

__all__ = [
    "MAX_PROXIES_PER_CLASS",
    "SPECIALISATIONS",
    "Specialisation",
    "similarity_terms",
    "similarity_terms_backward",
    "similarity_terms_forward",
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

    ``part`` is ``[2, splits, N]`` fp32: ``[0]`` the partial LSE (no zero logit, ``-inf`` if
    empty), ``[1]`` the positive term outside it (0 when ``y_i`` is not among the classes):
    ``softplus(z_iy)`` for MPA-DW, ``-z_iy`` for SoftTriple's cross-entropy, 0 for MPA-AP (its
    positive is inside).
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
    logit (the merge adds it once).
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


# Gradient: dL/dz of every pair from the terms and their gradient is common.terms_vjp (its
# derivation is written there, shared with the fused-linear backward); then
# dL/dS_ic = alpha * sign_ic * dL/dz_ic (common.loss_logits) and ds = dS/ds * dL/dS
# (common.class_similarity_vjp). Every tile is independent once the terms are known.
@triton.jit
def _backward_kernel(s_ptr, ds_ptr, labels_ptr, terms_ptr, grad_ptr, N, C, K,
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
    # MPA-DW's log-sum-exp runs over the negatives; the others' over every class.
    if LOSS == LOSS_MPA_DW:
        include = pair_ok & ~is_pos
    else:
        include = pair_ok
    dz = terms_vjp(z, is_pos, include, rows, rows < N, cls, cls < C, N, C, terms_ptr, grad_ptr,
                   LOSS)
    dS = tl.where(pair_ok, alpha * sign * dz, 0.0)
    ds = class_similarity_vjp(s, q, S, dS, inv_gamma, sim)
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Specialisations: the one place that maps (kernel, loss, K, dtype) to constexprs.

# Runtime arguments of each kernel, in order, with their Triton types; "S" is s's element type.
_FORWARD_ARGS = (("s_ptr", "*S"), ("labels_ptr", "*i64"), ("part_ptr", "*fp32"), ("N", "i32"),
                 ("C", "i32"), ("K", "i32"), ("blocks_per_split", "i32"), ("alpha", "fp32"),
                 ("delta", "fp32"), ("inv_gamma", "fp32"), ("sim", "i32"))
_BACKWARD_ARGS = (("s_ptr", "*S"), ("ds_ptr", "*S"), ("labels_ptr", "*i64"),
                  ("terms_ptr", "*fp32"), ("grad_ptr", "*fp32"), ("N", "i32"), ("C", "i32"),
                  ("K", "i32"), ("alpha", "fp32"), ("delta", "fp32"), ("inv_gamma", "fp32"),
                  ("sim", "i32"))
_KERNELS = {
    "row_forward": (_row_forward_kernel, _FORWARD_ARGS),
    "column_forward": (_column_forward_kernel, _FORWARD_ARGS),
    "backward": (_backward_kernel, _BACKWARD_ARGS),
}


def _column_wise(loss: str) -> bool:
    return LOSS_CODES[loss] == LOSS_MPA.value


def specialisation(kind: str, loss: str, proxies_per_class: int,
                   dtype: torch.dtype) -> Specialisation:
    """The kernel variant that computes ``loss`` for these inputs; ``kind`` is ``"forward"``,
    ``"merge"`` (the merge of the forward's split partials, :mod:`.launch`; fp32 whatever
    ``dtype``) or ``"backward"``. The similarity mode is a runtime argument, not part of the
    variant."""
    if kind == "merge":
        return merge_specialisation(_column_wise(loss))
    if proxies_per_class > MAX_PROXIES_PER_CLASS:
        raise ValueError(
            f"the triton backend supports up to {MAX_PROXIES_PER_CLASS} proxies per class, got "
            f"{proxies_per_class}; use backend='torch' or 'reference'"
        )
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"the triton kernels take fp32, fp16 or bf16 similarities, got {dtype}")
    if kind == "forward":
        kind = "column_forward" if _column_wise(loss) else "row_forward"
    kernel, args = _KERNELS[kind]
    k_pad = triton.next_power_of_2(proxies_per_class)
    constexprs = (("LOSS", LOSS_CODES[loss]), ("K_PAD", k_pad), ("BLOCK_N", BLOCK_N),
                  ("BLOCK_C", max(1, TILE_COLUMNS // k_pad)))
    arg_types = tuple((name, t.replace("S", TRITON_DTYPES[dtype])) for name, t in args)
    name = f"{kernel.__name__}[LOSS={LOSS_CODES[loss]},K_PAD={k_pad},{TRITON_DTYPES[dtype]}]"
    return Specialisation(name, kernel, arg_types, constexprs, NUM_WARPS)


def _enumerate_specialisations() -> tuple:
    """Every specialisation the launchers can produce, for the compile check."""
    out = {}
    for dtype in TRITON_DTYPES:
        for loss in LOSS_CODES:
            for kind in ("forward", "merge", "backward"):
                for k in range(1, MAX_PROXIES_PER_CLASS + 1):
                    spec = specialisation(kind, loss, k, dtype)
                    out[spec.name] = spec
    return tuple(out.values())


SPECIALISATIONS = _enumerate_specialisations()


# --------------------------------------------------------------------------------------------
# Host launchers.

def similarity_terms_forward(s: torch.Tensor, labels: torch.Tensor, loss: str, num_classes: int,
                             proxies_per_class: int, similarity: str, alpha: float, delta: float,
                             gamma: float) -> torch.Tensor:
    """The terms of the backends' contract (:mod:`mpa_kernels.backends`), fp32: ``(2, N)``
    (``lse``, ``extra``) row-wise, ``(2, C)`` (``P``, ``N``) column-wise, from ``s`` (N, C*K),
    contiguous, fp32/fp16/bf16, and int64 ``labels`` (N,), which may lie outside ``[0, C)`` (no
    positive class). Two launches: the forward over ``s`` and the merge of its split partials."""
    n, c, k = s.shape[0], num_classes, proxies_per_class
    spec = specialisation("forward", loss, k, s.dtype)
    block_c = dict(spec.constexprs)["BLOCK_C"]
    row_blocks, class_blocks = triton.cdiv(n, BLOCK_N), triton.cdiv(c, block_c)
    column_wise = _column_wise(loss)
    owned, swept = (class_blocks, row_blocks) if column_wise else (row_blocks, class_blocks)
    splits, per_split = plan_splits(owned, swept, s.device)
    part = torch.empty((2, splits, c if column_wise else n), device=s.device, dtype=torch.float32)
    spec.launch((owned, splits), s, labels, part, n, c, k, per_split, alpha, delta, 1.0 / gamma,
                SIMILARITY_CODES[similarity])
    return merge_splits(part, column_wise)


def similarity_terms_backward(grad: torch.Tensor, s: torch.Tensor, labels: torch.Tensor,
                              terms: torch.Tensor, loss: str, num_classes: int,
                              proxies_per_class: int, similarity: str, alpha: float, delta: float,
                              gamma: float) -> torch.Tensor:
    """``ds`` (the dtype and shape of ``s``) from the gradient ``grad`` of the terms (their shape)
    and the terms themselves."""
    n, c, k = s.shape[0], num_classes, proxies_per_class
    spec = specialisation("backward", loss, k, s.dtype)
    block_c = dict(spec.constexprs)["BLOCK_C"]
    ds = torch.empty_like(s)
    grid = (triton.cdiv(c, block_c), triton.cdiv(n, BLOCK_N))
    spec.launch(grid, s, ds, labels, terms, grad.float().contiguous(), n, c, k, alpha, delta,
                1.0 / gamma, SIMILARITY_CODES[similarity])
    return ds


# --------------------------------------------------------------------------------------------
# torch.library custom operators: torch.compile records them as single nodes (no graph break) and
# autograd goes through register_autograd, which is what a thin autograd.Function would do.

@torch.library.custom_op("mpa_kernels::similarity_terms", mutates_args=())
def _similarity_terms_op(s: torch.Tensor, labels: torch.Tensor, loss: str, num_classes: int,
                         proxies_per_class: int, similarity: str, alpha: float, delta: float,
                         gamma: float) -> torch.Tensor:
    return similarity_terms_forward(s, labels, loss, num_classes, proxies_per_class, similarity,
                                    alpha, delta, gamma)


@_similarity_terms_op.register_fake
def _(s, labels, loss, num_classes, proxies_per_class, similarity, alpha, delta, gamma):
    length = num_classes if _column_wise(loss) else s.shape[0]
    return s.new_empty((2, length), dtype=torch.float32)


@torch.library.custom_op("mpa_kernels::similarity_terms_backward", mutates_args=())
def _similarity_terms_backward_op(grad: torch.Tensor, s: torch.Tensor, labels: torch.Tensor,
                                  terms: torch.Tensor, loss: str, num_classes: int,
                                  proxies_per_class: int, similarity: str, alpha: float,
                                  delta: float, gamma: float) -> torch.Tensor:
    return similarity_terms_backward(grad, s, labels, terms, loss, num_classes,
                                     proxies_per_class, similarity, alpha, delta, gamma)


@_similarity_terms_backward_op.register_fake
def _(grad, s, labels, terms, loss, num_classes, proxies_per_class, similarity, alpha, delta,
      gamma):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, labels, *hyper = inputs
    ctx.save_for_backward(s, labels, output)
    ctx.hyper = hyper


def _backward(ctx, grad):
    s, labels, terms = ctx.saved_tensors
    ds = _similarity_terms_backward_op(grad, s, labels, terms, *ctx.hyper)
    return (ds,) + (None,) * (1 + len(ctx.hyper))


_similarity_terms_op.register_autograd(_backward, setup_context=_setup_context)


def similarity_terms(s: torch.Tensor, labels: torch.Tensor, loss: str, num_classes: int,
                     proxies_per_class: int, similarity: str, alpha: float, delta: float,
                     gamma: float) -> torch.Tensor:
    """The fp32 terms (see :func:`similarity_terms_forward`) from ``s`` (N, C*K), differentiable
    in ``s``."""
    return _similarity_terms_op(s.contiguous(), labels.long().contiguous(), loss, num_classes,
                                proxies_per_class, similarity, float(alpha), float(delta),
                                float(gamma))
