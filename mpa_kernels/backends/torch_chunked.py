"""The ``"torch"`` backend: chunked, analytic forward and backward in plain PyTorch ops, for CPUs.

Entry points: the scalar mean, :func:`proxy_loss` (raw proxies, regulariser included) and
:func:`similarity_loss` (unit proxies), which the front end prefers for ``reduction="mean"``; and
the unreduced terms of the backend contract, :func:`proxy_terms` (terms and the unscaled
regulariser) and :func:`similarity_terms`, for the other reductions and class-parallel shards.

The similarity tensor ``s = x_hat @ w_hat.T`` (N x C*K) is never materialised whole. Classes are
swept in chunks of whole classes; per chunk one GEMM gives ``s`` for a block of samples, the
intra-class reduction turns it into ``S`` (block x chunk) and leaves in its place the Jacobian
``dS/ds`` (scaled), and the loss needs only ``O(N + C)`` statistics of ``S``. When a gradient is
wanted, the forward forms it (for a grad_output of 1) and the backward only scales it: three GEMMs
in all, ``s = x w^T``, ``dx = ds w`` and ``dw = ds^T x``, the floor. Under ``torch.no_grad`` or with
inputs that do not require grad, the forward is the one GEMM.

* column-wise family (MPA, ProxyAnchor): a class's log-sum-exp runs over samples, and every chunk
  holds all N samples, so a class's statistics, and with them its gradient, are final inside its
  chunk: one sweep of all samples over the classes.
* row-wise family (MPA-DW, MPA-AP, SoftTriple, ProxyNCA): a sample's log-sum-exp runs over all
  classes, so a block of samples visits the classes twice: once for an online log-sum-exp,
  keeping each chunk's Jacobian and logits, once for the gradients. Where they fit (N (k + 2) <=
  K d, as at the paper's shapes), all samples form one block that keeps them in the chunks' own
  rows of the proxies' gradient, which only the second visit writes: no memory beyond the
  gradient. Else the blocks are as large as :data:`ROW_BLOCK_BYTES` of kept numbers allows; where
  that would leave fewer than :data:`MIN_BLOCK_ROWS` rows per block, all samples form one block
  that keeps nothing and recomputes each chunk on its second visit (a fourth GEMM).

Between the GEMMs, a chunk's work (the intra-class reduction, the logits, the log-sum-exps, the
gradient's scalings, the proxies' Gram matrices and the regulariser's and projection's terms) runs
in native loops, one pass per visit (``torch_native.cpp``, compiled on first use; see
:mod:`mpa_kernels.backends._native`); where they cannot be built, the eager ops beside each call
compute the same numbers, some ten passes and a hundred dispatches per chunk.

Positive pairs are few (one per sample): their similarities ``S_{i,y_i}`` come from a gather of the
K proxies of each sample's class (``N*K*d``), their terms are evaluated on ``(N,)`` vectors, and their
gradients are written into the chunk's ``dL/dS`` at the positive entries, so that they ride on the
chunk GEMMs like every other entry. Inside a chunk the positive entries are masked out of the
negatives' log-sum-exp with ``-inf``, which also makes their share of ``exp(z - lse)`` exactly zero.

Raw proxies (:func:`proxy_loss`): the proxies' normalisation and the regulariser of eq. 3 ride on
the same sweep. The proxies' inverse norms are computed once (C*K numbers); the GEMMs read the raw
rows and the norms scale the chunk's similarities (the mean mode's GEMMs read the classes' means
of the unit rows, formed per chunk). The regulariser's share of a chunk's classes and its gradient
are formed from the classes' K x K Gram matrices when the chunk's gradient is complete, and the
gradient is projected through the normalisation there, in the one gradient buffer of the raw
proxies: one batched product for both, and no unit row formed. The projection needs each row's
v . dL/dv, which is a sum over the chunk's similarities where the sweep still holds its GEMM's
output (the column-wise family; the row-wise one where the gradient's rows have room for it),
else a pass over the gradient rows; with it, the chunk is finished before its gradient is formed.
:func:`similarity_loss` (proxies already unit, no regulariser) is the same sweep without the
normalisation.

The terms (:func:`proxy_terms`, :func:`similarity_terms`): the same sweeps, written once for an
upstream gradient of the terms, which the mean knows in its forward (the constants of its
reduction) and the terms only get in their backward. Their forward is the sweep without gradients
(one GEMM, and for the row-wise family no kept chunks); it keeps the ``O(N + C)`` terms and the
positive logits, and the backward sweeps again with the upstream gradients, recomputing ``s``
chunk by chunk: four GEMMs in all. Keeping the chunks from the forward instead would hold up to
``ROW_BLOCK_BYTES`` across the caller's code between forward and backward, and for the column-wise
family (whose gradient is not complete inside a chunk without its upstream gradient) the whole
N x C*K Jacobian; the recomputation keeps the memory bound below. Labels outside ``[0, C)`` are
accepted there (a class-parallel shard's samples of another shard's classes): such a sample has no
positive and every class is its negative.

Memory above the inputs and the gradients: the chunk buffers, two of ``chunk_elements`` elements
(the default :data:`DEFAULT_CHUNK_ELEMENTS`; a chunk holds at least one class, so the bound is
``max(chunk_elements, N*K)``), the chunk's K x K Gram matrices and, in the mean mode, its unit
proxies (``chunk_elements / N * K / k * d`` elements, k the GEMMs' rows per class); a few block x
chunk similarity-level tensors; ``O(N + C*K)`` vectors; and, for the row-wise family's mean with
gradients where the proxies' gradient cannot hold it, at most ``ROW_BLOCK_BYTES`` (48 MiB) kept
between a block's two visits. Nothing of the proxies' size, and nothing of size C*K*K, is formed.
The proxies' gradient itself comes, with the native loops, from buffers kept for the next call
(:func:`_gradient_buffer`): between calls, the two largest freed gradients' memory stays mapped
until :func:`release_buffers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mpa_kernels._spec import LossSpec
# The front end's constants, so that the fused normalisation and regulariser are the unfused ones.
from mpa_kernels._checks import NORM_EPS as _NORM_EPS
from mpa_kernels._terms import REGULARIZER_EPS as _REGULARIZER_EPS
from mpa_kernels._terms import reduce_terms
from mpa_kernels.backends import _native

LOW_PRECISION = False

# Elements of one chunk of s (N x classes x K). The chunked GEMMs run as fast as the whole
# N x C*K ones from about a thousand proxy rows a chunk on; with fewer, larger chunks the fixed cost
# of a chunk (a dozen calls and their Python) falls. With the native loops, measured against the
# floor in one alternation at 2^17..2^21 (one thread, all six losses at the CUB, SOP and N=180,
# C=11318, K=10 shapes), 2^20 took 0.85-0.96x the time of 2^18 at SOP N=32, 0.94-1.00x at N=256
# and 0.94-1.04x at the last shape (the noise there: CUB, one chunk at every budget, read
# 0.91-1.02x); 2^21 was faster at N=32 only, slower at the last shape, with twice the buffers.
# Read at call time, so tests can lower it.
DEFAULT_CHUNK_ELEMENTS = 1 << 20

# What a row-wise loss keeps of one block of rows between its two visits of the classes (J, the
# logits and 1/Z of every class); read at call time, like the chunk budget.
ROW_BLOCK_BYTES = 48 << 20
# Blocks thinner than this are not formed: all rows go in one block that recomputes its chunks.
MIN_BLOCK_ROWS = 64
# Where it fits, what a row-wise loss keeps goes in the proxies' gradient buffer instead (see
# _row_blocks); off, it goes in blocks of ROW_BLOCK_BYTES. Read at call time, so tests can switch.
KEEP_IN_GRADIENT = True
# A chunk's work between its GEMMs in the native loops (torch_native.cpp, built on first use)
# where they can be built, else in eager ops (the same numbers, slower). Read at call time, so
# tests can switch.
NATIVE = True


def _native_ops(x: torch.Tensor):
    """The native loops for these inputs, or None: the eager ops then run."""
    if not NATIVE or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    return _native.module()


# The proxies' gradient from buffers that the native loops keep for the next call (see
# torch_native.cpp, "Buffers kept for the next call"): its memory stays mapped between calls, and
# its first write costs no page faults. Read at call time, so tests can switch.
REUSE_GRADIENT_BUFFERS = True
# Smaller buffers come from memory the allocator has mapped already, more often than not.
_REUSE_MIN_BYTES = 1 << 20


def _gradient_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of like's shape and dtype, for the proxies' gradient."""
    native = _native_ops(like) if REUSE_GRADIENT_BUFFERS else None
    if native is None or like.numel() * like.element_size() < _REUSE_MIN_BYTES:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return native.reused_empty(list(like.shape), like)


def release_buffers() -> int:
    """Frees the proxies' gradient buffers kept for later calls (otherwise held until the process
    ends: the two largest the backend has returned and got back); returns their bytes."""
    native = _native.module()
    return native.release_buffers() if native is not None else 0


def unavailable_reason(device: torch.device) -> str | None:
    return None


def similarity_loss(
    x_hat: torch.Tensor,
    w_hat: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    *,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """The similarity term from unit proxies ``w_hat`` (C*K, d)."""
    return _loss(x_hat, w_hat, labels, spec, 0.0, False, chunk_elements)


def proxy_loss(
    x_hat: torch.Tensor,
    proxies: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    tau: float,
    *,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """The whole loss from raw proxies (C*K, d): similarity term plus ``tau`` times eq. 3."""
    return _loss(x_hat, proxies, labels, spec, tau, True, chunk_elements)


def similarity_terms(
    x_hat: torch.Tensor,
    w_hat: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    *,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """The unreduced terms, (2, N) or (2, C) as the backend contract says, from unit proxies."""
    return _terms(x_hat, w_hat, labels, spec, False, chunk_elements)[0]


def proxy_terms(
    x_hat: torch.Tensor,
    proxies: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    *,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unreduced terms from raw proxies (C*K, d), and eq. 3 unscaled (a 0-dim tensor)."""
    return _terms(x_hat, proxies, labels, spec, True, chunk_elements)


def _checked_budget(chunk_elements):
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    return chunk_elements


def _loss(x_hat, w, labels, spec, tau, normalise, chunk_elements):
    chunk_elements = _checked_budget(chunk_elements)
    problem = _Problem.of(spec, tau, normalise)
    want = torch.is_grad_enabled()
    return _ChunkedProxyLoss.apply(
        x_hat, w, labels, problem, chunk_elements,
        want and x_hat.requires_grad, want and w.requires_grad,
    )


def _terms(x_hat, w, labels, spec, normalise, chunk_elements):
    chunk_elements = _checked_budget(chunk_elements)
    # tau = 1: eq. 3 is returned unscaled (its weight arrives as its upstream gradient).
    problem = _Problem.of(spec, 1.0 if normalise else 0.0, normalise)
    return _ChunkedTerms.apply(x_hat, w, labels, problem, chunk_elements)


@dataclass(frozen=True)
class _Problem:
    """The loss as the sweep needs it: its family, the constants of its logits, the reduction, and
    what is done to the proxies on their way to the GEMMs."""

    loss: str
    column_wise: bool
    num_classes: int
    proxies_per_class: int  # rows of the proxies per class
    k: int  # rows per class that the GEMMs see: 1 in the mean mode, else proxies_per_class
    similarity: str  # "softmax", "max", or "identity" (K == 1, or the mean mode reduced to it)
    alpha: float
    delta: float
    gamma: float
    tau: float  # weight of eq. 3 in the loss; 0 where there is none to add (K == 1 included)
    normalise: bool  # the proxies are raw rows, to be scaled to unit norm
    spec: LossSpec  # the loss as the front end describes it (for its reduction of the terms)

    @classmethod
    def of(cls, spec: LossSpec, tau: float, normalise: bool) -> "_Problem":
        k = spec.proxies_per_class
        # mean_k (x . w_ck) = x . mean_k(w_ck): the mean mode is the one-proxy problem on the
        # classes' averaged unit proxies, K times cheaper.
        k_gemm = 1 if spec.similarity == "mean" else k
        similarity = spec.similarity if k_gemm > 1 else "identity"
        return cls(spec.loss, spec.column_wise, spec.num_classes, k, k_gemm, similarity,
                   spec.alpha, spec.delta, spec.gamma, float(tau) if k > 1 else 0.0, normalise,
                   spec)

    @property
    def averaged(self) -> bool:
        return self.k != self.proxies_per_class

    @property
    def negative_delta(self) -> float:
        # Negative logits are alpha * (S + delta) for MPA/ProxyAnchor, alpha * S for SoftTriple.
        return 0.0 if self.loss in ("soft_triple", "proxy_nca") else self.delta

    @property
    def positive_sign(self) -> float:
        # Positive logits are -alpha * (S - delta) (MPA family), +alpha * (S - delta) (SoftTriple).
        return 1.0 if self.loss in ("soft_triple", "proxy_nca") else -1.0


# --- intra-class reduction, eq. 1 ---------------------------------------------------------------
# Each reduction maps a chunk t (n, m, K) of the GEMM's output to S (n, m) and overwrites t with
# what its backward needs, J = Z dS/ds, with the factor 1/Z (n, m) returned apart (or None where
# Z = 1): ds = J * (G / Z) for G = dL/dS. The factor rides on G, which has K times fewer entries.


def _sum_last(a: torch.Tensor) -> torch.Tensor:
    """a.sum(-1) over a short last dimension (the K proxies of a class), as a matrix-vector
    product: twice as fast as the reduction on CPU at K = 10."""
    k = a.shape[-1]
    return torch.mv(a.reshape(-1, k), a.new_ones(k)).view(a.shape[:-1])


class _Softmax:
    """S = sum_k p_k s_k, p = softmax_k(s / gamma).

    The GEMM is fed x_hat / gamma, so it yields t = s / gamma directly. Since |s| <= 1, exp(t) lies
    in [e^(-1/gamma), e^(1/gamma)]; when that range fits the dtype, no max is subtracted (the
    shift cancels in p and saves a reduction and a pass). h = S / gamma = sum_k e_k t_k / Z.

    Gradient: dS/ds_k = p_k (1 + (s_k - S) / gamma) = (e_k / Z)(t_k - h + 1), so J = e (t - h + 1).
    t - h is formed before anything is added to it: both are of size 1/gamma and only their
    difference is of size one (exactly 0 where p is one-hot), so at small gamma the gradient keeps
    fp32's precision where e t and e h, formed apart and subtracted, would lose it.
    """

    native_mode = 1

    def __init__(self, gamma: float, k: int, dtype: torch.dtype) -> None:
        self.gamma = gamma
        self.x_scale = 1.0 / gamma
        info = torch.finfo(dtype)
        # Largest sum_k e_k t_k is K e^(1/gamma) / gamma; smallest largest-e_k is e^(-1/gamma).
        top = self.x_scale + math.log(k * max(self.x_scale, 1.0))
        self.shift = top > math.log(info.max) - 1.0 or self.x_scale > -math.log(info.tiny) - 1.0

    def forward(self, t: torch.Tensor, e: torch.Tensor):
        if self.shift:
            torch.sub(t, t.amax(-1, keepdim=True), out=e).exp_()
        else:
            torch.exp(t, out=e)
        z = _sum_last(e)
        h = _sum_last(e * t).div_(z)
        # t - (h - 1): h - 1 is exact for |h| >= 1 (and t - (h - 1) then rounds once), and within
        # one ulp of 1 below.
        t.sub_(h.sub(1.0).unsqueeze(-1)).mul_(e)
        return h.mul_(self.gamma), z.reciprocal_()


class _Max:
    """S = max_k s_k; the whole gradient goes to the argmax (the same tie-break as the
    reference's ``max(dim)``): J is its indicator."""

    x_scale = 1.0
    native_mode = 2

    def forward(self, t: torch.Tensor, e: torch.Tensor):
        values, index = t.max(-1)
        t.zero_().scatter_(-1, index.unsqueeze(-1), 1.0)
        return values, None


class _Identity:
    """K = 1: S = s; ds = G, so J is not formed (S is t's own buffer)."""

    x_scale = 1.0
    native_mode = 0

    def forward(self, t: torch.Tensor, e: torch.Tensor):
        return t.squeeze(-1), None


def _reduction(problem: _Problem, dtype: torch.dtype):
    if problem.similarity == "softmax":
        return _Softmax(problem.gamma, problem.k, dtype)
    return _Max() if problem.similarity == "max" else _Identity()


# --- the proxies: normalisation, averaging, regulariser -----------------------------------------
#
# Unit rows u = v / max(||v||, eps), inv = 1 / max(||v||, eps), computed once for every row (C*K
# numbers, kept). Where the GEMMs read the raw rows, x u^T = (x v^T) * inv column by column and
# ds u = (ds * inv) v: the normalisation costs two scalings of the chunk's similarities and no copy
# of the proxies, and the gradient buffer accumulates du' = inv * dL/du = (ds * inv)^T x. The
# gradient through the normalisation (as F.normalize's) is dv = inv (du - u (u . du)), i.e.
# dv = du' - u (u . du') = du' - c v with c = inv^2 (v . du'), and dv = du / eps = du' (c = 0) for
# a row whose norm was clamped (there u = v / eps is linear in v).
#
# Regulariser (eq. 3): R = a sum_c sum_{t<s} sqrt(2 - 2 min(u_ct . u_cs, 1) + eps), a = 1/(C K (K-1)).
# d sqrt(2 - 2 m + eps) / d m = -1 / sqrt(2 - 2 m + eps), and the clamp passes the gradient where
# m <= 1 (torch's clamp includes its bound). A pair {t, s} is summed once but its term depends on
# both u_ct (through u_cs) and u_cs (through u_ct), so with the symmetric K x K matrix
#   G_ts = G_st = -a / sqrt(2 - 2 m_ts + eps)  (t != s, m_ts <= 1),  0 elsewhere (diagonal too),
# dR/dU_c = G U_c (no factor 2), and du' gets inv G U = diag(inv) G diag(inv) V.
#
# Everything the regulariser and the projection need of a class's rows beyond the GEMMs' du' is in
# its Gram matrix A = V V^T (K x K, one batched product per chunk): the norms are sqrt(A_tt), the
# unit rows' similarities m_ts = inv_t inv_s A_ts, and with Mr = diag(inv) G diag(inv)
#   v_t . du'_t = v_t . D_t + sum_s Mr_ts A_ts,   D = (ds * inv)^T x, the GEMMs' part.
# v_t . D_t = sum_i ds_it inv_t (x_i . v_t) is a column sum over the chunk's similarities where its
# GEMM output x v^T is still at hand; it is then known before D, and the gradient rows are set to
# (Mr - diag(c)) V (one batched product) before the GEMM adds D to them. Else it is the diagonal
# of V D^T (a batched product: K times the multiply-adds of the row dots, but in a GEMM kernel,
# and faster than them on CPU), and (Mr - diag(c)) V is added to D. Either way
# dv = D + (Mr - diag(c)) V, and no unit row is formed.
#
# Mean mode: the GEMMs see wbar_c = mean_k u_ck (unit rows formed per chunk for that), so
# D_ck = inv_ck dwbar_c / K for every k; the rest is as above.


def _inverse_norms(w: torch.Tensor):
    """1 / max(||v||, eps) of every row (rows, 1), and the mask ||v|| > eps."""
    return _norm_terms(torch.linalg.vector_norm(w, dim=1, keepdim=True))


def _gram(v3: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.bmm(v3, v3.transpose(1, 2), out=out)


def _norm_terms(norm: torch.Tensor):
    """1 / max(||v||, eps) and the mask ||v|| > eps from the norms (any shape), in place."""
    unclamped = norm > _NORM_EPS
    return norm.clamp_min_(_NORM_EPS).reciprocal_(), unclamped


def _regularizer(sims: torch.Tensor, upper: torch.Tensor, scale: float, weight: float | None):
    """Eq. 3's sum over the chunk's classes from their unit proxies' similarities sims (m, K, K),
    times scale (a), and unless weight is None the matrix weight * G (m, K, K) of the derivation
    above. upper: the flattened pairs t < s of as many classes, 1 and 0."""
    # 2 (1 - m) + eps, in that order: 2 + eps rounds to 2 in fp32, which would make the distance of
    # two identical proxies 0 and its reciprocal below inf. 2 (1 - m) rounds exactly as 2 - 2 m.
    dist = torch.rsub(sims.clamp(max=1.0), 1.0).mul_(2.0).add_(_REGULARIZER_EPS).sqrt_()
    # The pairs by a product with the mask, not a boolean index (a gather per chunk).
    value = torch.dot(dist.view(-1), upper[:dist.numel()]) * scale
    if weight is None:
        return value, None
    # A select, not a product with a mask: in fp32 the eps vanishes next to 2 and the diagonal's
    # distance is 0, its reciprocal inf.
    g = torch.where(sims <= 1.0, dist.reciprocal_(), 0.0)
    g.diagonal(0, 1, 2).zero_()
    return value, g.mul_(-scale * weight)


@dataclass
class _Chunk:
    start: int  # first class
    stop: int
    v: torch.Tensor  # its rows of the proxies as given, (m*K, d)
    inv: torch.Tensor | None  # their 1/||v|| (m*K, 1), when they are to be normalised
    proj: torch.Tensor | None  # c / (v . du') of the projection: inv^2, 0 where clamped (m*K, 1)
    w: torch.Tensor  # the GEMMs' operand (m*k, d): v, or the class means of u in the mean mode
    col_scale: torch.Tensor | None  # (m*k,): what scales x w^T into s (inv), None if nothing
    gram: torch.Tensor | None = None  # V V^T (m, K, K) where the norms came from it, for finish


class _Proxies:
    """The proxies as the sweeps read them, chunk by chunk, in reused buffers."""

    def __init__(self, w: torch.Tensor, problem: _Problem, per_chunk: int) -> None:
        self.w, self.problem = w, problem
        # The native loops read the rows as one block: contiguous proxies only.
        self.native = _native_ops(w) if w.is_contiguous() else None
        self.inv = self.proj = None
        if problem.normalise:
            # Filled chunk by chunk on the first visit, while the chunk's rows are on their way to
            # its GEMM, rather than by a pass of their own over all the proxies.
            self.inv, self.proj = w.new_empty(w.shape[0], 1), w.new_empty(w.shape[0], 1)
        self.normed = 0  # rows of inv filled so far (chunks are first visited in order)
        kp, d = problem.proxies_per_class, w.shape[1]
        if problem.tau:
            self.upper = torch.ones(kp, kp, dtype=w.dtype, device=w.device).triu_(1).expand(
                per_chunk, kp, kp).reshape(-1)
            self.reg_scale = 1.0 / (problem.num_classes * kp * (kp - 1))
        # Unit rows are formed only for the mean mode's class means.
        self.u_buf = w.new_empty(per_chunk * kp * d) if problem.averaged else None
        self.mean_buf = w.new_empty(per_chunk * d) if problem.averaged else None

    def chunk(self, start: int, stop: int, with_gram: bool = False,
              gram_out: torch.Tensor | None = None) -> _Chunk:
        """Classes [start, stop). with_gram: the regulariser's Gram matrices are formed now (into
        gram_out if given) and the norms read from them, for the chunk's finish; else the norms
        are computed alone and finish forms the Gram matrices itself."""
        kp = self.problem.proxies_per_class
        v = self.w[start * kp:stop * kp]
        inv = proj = gram = None
        if self.inv is not None:
            inv, proj = self.inv[start * kp:stop * kp], self.proj[start * kp:stop * kp]
            with_gram = with_gram and bool(self.problem.tau)
            if self.native is not None and (with_gram or stop * kp > self.normed):
                # The Gram matrices where the regulariser wants them, else each row's norm alone
                # (the Gram matrix of a class of one row): with the norms, in one pass.
                size = (stop - start, kp, kp) if with_gram else (v.shape[0], 1, 1)
                out = gram_out if with_gram and gram_out is not None else v.new_empty(size)
                self.native.class_gram(v, size[1], out, inv, proj, _NORM_EPS)
                gram = out if with_gram else None
                self.normed = max(self.normed, stop * kp)
            elif with_gram:
                gram = _gram(v.view(stop - start, kp, -1), gram_out)
            if stop * kp > self.normed:
                norm_inv, mask = (_norm_terms(gram.diagonal(0, 1, 2).reshape(-1, 1).sqrt())
                                  if gram is not None else _inverse_norms(v))
                inv.copy_(norm_inv)
                torch.mul(norm_inv.square_(), mask, out=proj)
                self.normed = stop * kp
        chunk = _Chunk(start, stop, v, inv, proj, v, None, gram)
        if self.problem.averaged:
            m, d = stop - start, v.shape[1]
            u = v if inv is None else torch.mul(v, inv, out=self.u_buf[:v.numel()].view(v.shape))
            chunk.w = torch.mean(u.view(m, kp, d), 1, out=self.mean_buf[:m * d].view(m, d))
        elif inv is not None:
            chunk.col_scale = inv.view(-1)
        return chunk

    def add_grad(self, chunk: _Chunk, ds: torch.Tensor, x: torch.Tensor, du: torch.Tensor,
                 first: bool) -> None:
        """du (this chunk's rows of the gradient buffer) = or += D of ds (n, m*k) and x (n, d)."""
        if not self.problem.averaged:
            if first:
                torch.mm(ds.T, x, out=du)
            else:
                du.addmm_(ds.T, x)
            return
        kp = self.problem.proxies_per_class
        du3 = du.view(-1, kp, x.shape[1])
        dwbar = torch.mm(ds.T, x).unsqueeze(1).expand(du3.shape)
        factor = chunk.inv.view(-1, kp, 1) / kp if chunk.inv is not None else 1.0 / kp
        if first:
            torch.mul(dwbar, factor, out=du3)
        else:
            du3.addcmul_(dwbar, factor)

    def finish(self, chunk: _Chunk, du: torch.Tensor | None, weight: float = 0.0,
               vd: torch.Tensor | None = None):
        """The chunk's share of eq. 3 (0 without it) and, with du, the rest of its gradient: the
        regulariser's share, scaled by weight (tau in the loss, the regulariser's upstream
        gradient in the terms), and the projection through the normalisation. vd: the rows'
        v . D (m*K,), known before D is formed; du is then set to those terms, to which D is to
        be added. Without vd, du holds D, v . D is read from it and the terms are added."""
        problem, kp = self.problem, self.problem.proxies_per_class
        if chunk.inv is None:  # unit proxies given: no normalisation, and no regulariser
            return 0.0
        v3 = chunk.v.view(-1, kp, chunk.v.shape[1])
        if self.native is not None and du is not None and vd is not None:
            gram = None
            if problem.tau:
                gram = chunk.gram if chunk.gram is not None else _gram(v3)
            return self.native.finish(chunk.v, gram, chunk.inv, chunk.proj, vd, kp,
                                      self.reg_scale if problem.tau else 0.0, weight,
                                      _REGULARIZER_EPS, du)
        value, mr = 0.0, None
        if problem.tau:
            gram = chunk.gram if chunk.gram is not None else _gram(v3)
            inv3 = chunk.inv.view(-1, kp, 1)
            outer = inv3 * inv3.transpose(1, 2)
            value, g = _regularizer(gram * outer, self.upper, self.reg_scale,
                                    weight if du is not None and weight else None)
            if g is not None:
                mr = g.mul_(outer)
        if du is None:
            return value
        du3 = du.view(v3.shape)
        # c = inv^2 (v . du') masked, v . du' = v . D (+ sum_s Mr_ts A_ts).
        dot = (vd.view(-1, kp) if vd is not None
               else torch.bmm(v3, du3.transpose(1, 2)).diagonal(0, 1, 2))
        if mr is not None:
            dot = dot + (mr * gram).sum(2)
        coef = dot.reshape(-1, 1).mul_(chunk.proj)
        if mr is None:
            if vd is not None:
                torch.mul(chunk.v, coef.neg_(), out=du)
            else:
                du.addcmul_(chunk.v, coef, value=-1.0)
        else:
            mr.diagonal(0, 1, 2).sub_(coef.view(-1, kp))
            if vd is not None:
                torch.bmm(mr, v3, out=du3)
            else:
                du3.baddbmm_(mr, v3)
        return value


# --- the sweep over a block of rows and chunks of classes ---------------------------------------


@dataclass
class _Visit:
    chunk: _Chunk
    t: torch.Tensor  # J (n, m, k) in its buffer; S itself in the identity
    inv_z: torch.Tensor | None  # 1/Z (n, m), or None
    z: torch.Tensor  # the negative logits alpha (S + delta_neg) (n, m), -inf at the positives
    rows: torch.Tensor  # rows of the block whose positive class is in the chunk
    cols: torch.Tensor  # and that class, relative to the chunk's start
    raw: torch.Tensor | None = None  # x_scale x v^T (n, m*k), kept for the projection's dot


class _Block:
    """Rows [lo, hi) of x against every class, chunk by chunk. With a store (one flat region per
    chunk, and the _Kept that says what goes in it), a visit leaves in chunk j's region what the
    second visit needs, and the whole block is kept; else a visit's J is in one reused buffer.
    in_gradient: the regions are the chunks' own rows of the proxies' gradient buffer, which the
    second visit overwrites once it has read them: what it computes goes elsewhere first.
    one_visit: each chunk is finished in the visit that forms it (the column-wise sweep): its Gram
    matrices come with its norms, and the GEMM's output is kept (a buffer more) until the
    chunk's gradient gives the projection's dot from it.

    Between the GEMMs, a visit's work runs in the native loops where they are available (one
    pass each for the forward and the gradient), else in the eager ops below them, which say
    the same arithmetic step by step."""

    def __init__(self, xs, labels, problem, reduction, proxies, per_chunk, store=None, kept=None,
                 in_gradient=False, one_visit=False):
        self.xs, self.problem, self.reduction, self.proxies = xs, problem, reduction, proxies
        self.one_visit = one_visit
        n, k, c = xs.shape[0], problem.k, problem.num_classes
        self.per_chunk, self.starts = per_chunk, list(range(0, c, per_chunk))
        self.store, self.kept, self.in_gradient = store, kept, in_gradient
        self.native = _native_ops(xs)
        self.identity = isinstance(reduction, _Identity)
        softmax = isinstance(reduction, _Softmax)
        # J's buffer where it is not kept, and ds's where J is kept in the gradient's rows.
        self.t_buf = (xs.new_empty(n * per_chunk * k)
                      if store is None or self.identity or in_gradient else None)
        # The logits and 1/Z where they are not kept.
        self.z_buf = xs.new_empty(n * per_chunk) if store is None else None
        self.iz_buf = (xs.new_empty(n * per_chunk)
                       if store is None and softmax and self.native is not None else None)
        # The GEMM's output, kept for the projection's dot by a chunk finished in its visit.
        self.r_buf = (xs.new_empty(n * per_chunk * k)
                      if one_visit and problem.normalise and not problem.averaged else None)
        self.e_buf = (xs.new_empty(n * per_chunk * k) if softmax and self.native is None
                      else None)
        self.labels = labels.to(torch.int64).contiguous()
        # Rows sorted by label: those whose positive lies in a chunk are one slice of the order.
        self.sorted_labels, self.order = torch.sort(labels, stable=True)
        self.cuts = torch.searchsorted(self.sorted_labels,
                                       torch.tensor(self.starts + [c])).tolist()

    def visit(self, j: int, run: tuple[torch.Tensor, torch.Tensor] | None = None) -> _Visit:
        """Chunk j's GEMM and what follows it. run: the rows' running max and sum of the online
        log-sum-exp over the chunks so far (the row-wise family), updated in place."""
        n, k, problem = self.xs.shape[0], self.problem.k, self.problem
        start = self.starts[j]
        stop = min(problem.num_classes, start + self.per_chunk)
        size, m = n * (stop - start) * k, stop - start
        parts = (self.kept.views(self.store[j], n, m, k, problem.proxies_per_class)
                 if self.store is not None else {})
        chunk = self.proxies.chunk(start, stop, self.one_visit or "gram" in parts,
                                   parts.get("gram"))
        t_out = parts.get("j", self.t_buf[:size].view(n, -1) if self.t_buf is not None else None)
        raw_out = parts.get("raw", self.r_buf[:size].view(n, -1) if self.r_buf is not None
                            else None)
        z = parts.get("z", self.z_buf[:n * m].view(n, m) if self.z_buf is not None else None)
        keep_raw = chunk.col_scale is not None and raw_out is not None
        product = torch.mm(self.xs, chunk.w.T, out=raw_out if keep_raw else t_out)
        raw = product if keep_raw else None
        lo, hi = self.cuts[j], self.cuts[j + 1]
        rows, cols = self.order[lo:hi], self.sorted_labels[lo:hi] - start
        if self.native is not None:
            inv_z = None
            if isinstance(self.reduction, _Softmax):
                inv_z = parts.get("inv_z", self.iz_buf[:n * m].view(n, m)
                                  if self.iz_buf is not None else None)
            reduction = self.reduction
            self.native.visit_forward(
                product, chunk.col_scale, t_out, z, inv_z, self.labels, start,
                reduction.native_mode, k, getattr(reduction, "gamma", 1.0),
                getattr(reduction, "shift", False), problem.alpha, problem.negative_delta,
                *(run if run is not None else (None, None)))
            return _Visit(chunk, t_out.view(n, -1, k), inv_z, z, rows, cols, raw)
        if keep_raw:
            t2 = torch.mul(raw, chunk.col_scale, out=t_out)
        else:
            t2 = product
            if chunk.col_scale is not None:
                t2.mul_(chunk.col_scale)
        t = t2.view(n, -1, k)
        e = self.e_buf[:size].view(t.shape) if self.e_buf is not None else None
        s, inv_z = self.reduction.forward(t, e)
        if "inv_z" in parts:
            inv_z = parts["inv_z"].copy_(inv_z)
        z = torch.add(s, problem.negative_delta, out=z).mul_(problem.alpha)
        z.index_put_((rows, cols), z.new_tensor(float("-inf")))
        if run is not None:
            run_max, run_sum = run
            new_max = torch.maximum(run_max, z.amax(1))
            run_sum.mul_(run_max.sub_(new_max).exp_()).add_(
                torch.sub(z, new_max.unsqueeze(1)).exp_().sum(1))
            run_max.copy_(new_max)
        return _Visit(chunk, t, inv_z, z, rows, cols, raw)

    def column_lse(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """N_c = log(1 + sum_i e^z_ic) of a visited chunk's logits (n, m), into out (m,)."""
        if self.native is not None:
            self.native.column_lse(z, out)
            return out
        zmax = z.amax(0).clamp_min_(0.0)  # the zero logit takes part in the max
        total = torch.sub(z, zmax).exp_().sum(0).add_(zmax.neg().exp_())
        return out.copy_(total.log_().add_(zmax))

    def chunk_gradient(self, visit: _Visit, g_pos: torch.Tensor, row_shift=None,
                       row_weight=None, col_shift=None, col_weight=None):
        """ds (n, m*k) of a visited chunk and, where its GEMM's output was kept, the rows'
        v . D = sum_i ds_it inv_t (x_i . v_t) (m*k,), the column sums of ds * inv times that
        output. dL/dS = e^(z - row_shift_i - col_shift_c) row_weight_i col_weight_c at the
        negatives (each factor 1 or 0 where None), and g_pos_i at row i's positive. Overwrites
        the logits, and J unless it is in the gradient's rows."""
        n, m = visit.z.shape
        k, chunk = self.problem.k, visit.chunk
        ds_out = (self.t_buf[:n * m * k].view(n, -1) if self.in_gradient
                  else visit.z if self.identity else visit.t.view(n, -1))
        scale = self.reduction.x_scale
        if self.native is not None:
            vd = visit.raw.new_empty(m * k) if visit.raw is not None else None
            self.native.chunk_gradient(
                visit.z, None if self.identity else visit.t, visit.inv_z, chunk.col_scale,
                visit.raw, self.labels, chunk.start, g_pos, row_shift, row_weight, col_shift,
                col_weight, k, ds_out, vd, 1.0 / scale)
            return ds_out, vd
        # In the identity the gradient is ds itself; in the gradient's rows it must not stay
        # there, which the proxies' gradient overwrites before ds has been read.
        g = ds_out if self.identity and self.in_gradient else visit.z
        shift = row_shift.unsqueeze(1) if row_shift is not None else col_shift
        torch.sub(visit.z, shift, out=g).exp_()
        if row_weight is not None:
            g.mul_(row_weight.unsqueeze(1))
        if col_weight is not None:
            g.mul_(col_weight)
        g.index_put_((visit.rows, visit.cols), g_pos[visit.rows])
        if visit.inv_z is not None:
            g.mul_(visit.inv_z)
        if not self.identity:
            torch.mul(visit.t, g.unsqueeze(-1), out=ds_out.view(visit.t.shape))
        ds = ds_out
        if chunk.col_scale is not None:
            ds.mul_(chunk.col_scale)
        if visit.raw is None:
            return ds, None
        vd = visit.raw.mul_(ds).sum(0)
        return ds, vd.div_(scale) if scale != 1.0 else vd

    def write_grads(self, visit: _Visit, ds: torch.Tensor, vd: torch.Tensor | None, x, dx, dw,
                    first: bool, reg_weight: float = 0.0):
        """dx += ds u[chunk] and the chunk's D (= when first, else +=). With vd (the GEMM's output
        was kept), the chunk is finished here, before D is formed (see _Proxies.finish), and its
        share of eq. 3 is returned; else None, and the chunk is left to finish."""
        chunk = visit.chunk
        if dx is not None:
            dx.addmm_(ds, chunk.w)
        if dw is None:
            return None
        kp = self.problem.proxies_per_class
        du = dw[chunk.start * kp:chunk.stop * kp]
        if vd is None:
            self.proxies.add_grad(chunk, ds, x, du, first)
            return None
        value = self.proxies.finish(chunk, du, reg_weight, vd)
        self.proxies.add_grad(chunk, ds, x, du, first=False)
        return value


def _classes_per_chunk(chunk_elements: int, rows: int, problem: _Problem, d: int) -> int:
    """Classes per chunk: rows x classes x k similarities within the budget, and the chunk's
    unit proxies (classes x K x d, formed for the regulariser and the mean mode) within four
    times it."""
    return min(problem.num_classes, max(1, chunk_elements // (rows * problem.k)),
               max(1, 4 * chunk_elements // (problem.proxies_per_class * d)))


def _positive_similarity(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                         problem: _Problem, reduction) -> torch.Tensor:
    """S_{i, y_i} for every sample, (N,): a gather of its class's K proxies, N*K*d work."""
    kp, d = problem.proxies_per_class, w.shape[1]
    index = (labels * kp).unsqueeze(1) + torch.arange(kp, device=labels.device)
    w_pos = w.index_select(0, index.view(-1))  # (N*K, d), whatever w's strides
    if problem.normalise:
        w_pos = w_pos.mul_(_inverse_norms(w_pos)[0])
    w_pos = w_pos.view(-1, kp, d)
    if problem.averaged:
        w_pos = w_pos.mean(1, keepdim=True)
    # The product in place (w_pos is this function's own gather) and a sum, not bmm, whose N
    # products of K x d by d x 1 cost ~1 us each: at N=180, d=512 0.03 against 0.23 ms for K = 1
    # (a tenth of the call at the CUB shape), 0.39 against 0.43 ms for K = 10.
    t = w_pos.mul_((x * reduction.x_scale).unsqueeze(1)).sum(-1).view(x.shape[0], 1, problem.k)
    s, _ = reduction.forward(t, torch.empty_like(t))
    return s.reshape(-1)


def _scaled(x: torch.Tensor, reduction) -> torch.Tensor:
    return x * reduction.x_scale if reduction.x_scale != 1.0 else x


def _proxy_rows(dw: torch.Tensor | None, chunk: _Chunk, problem: _Problem):
    kp = problem.proxies_per_class
    return dw[chunk.start * kp:chunk.stop * kp] if dw is not None else None


# --- the two families ---------------------------------------------------------------------------
#
# Each family returns the unreduced terms of the backend contract, the positive logits q (N,) and
# eq. 3's sum, and with a _Grads writes the gradients of sum(g * terms) + g_R * R for upstream
# gradients g of the terms and g_R of R. The mean's path knows them in its forward (the constants
# of its reduction); the terms' path gets them in its backward.
#
# A label outside [0, C) names a class that is not among these (a class-parallel shard): its row
# has no positive, q_i = -inf (it drops out of every log-sum-exp, with a zero gradient), every
# class is its negative, and the sort in _Block leaves it out of every chunk's positives.


@dataclass
class _Grads:
    dx: torch.Tensor | None  # dL/dx_hat (N, d), accumulated; None if not wanted
    dw: torch.Tensor | None  # dL/dproxies (C*K, d); None if not wanted
    upstream: object  # the upstream gradient of the terms, in the family's form (see each)
    reg_weight: float  # and that of eq. 3's sum


def _label_index(labels, c):
    """Which labels are among the C classes, and the labels clamped into [0, C) for gathers."""
    return (labels >= 0) & (labels < c), labels.clamp(0, c - 1)


def _positive_logits(x, w, valid, index, problem, reduction):
    """q_i = sign alpha (S_iy - delta) (N,), -inf where y_i is not one of the C classes."""
    s = _positive_similarity(x, w, index, problem, reduction)
    q = (s - problem.delta) * (problem.positive_sign * problem.alpha)
    return q.masked_fill_(~valid, float("-inf"))


# Column-wise (MPA, eq. 6; ProxyAnchor): z_ic = alpha (S_ic + delta) over negatives,
# q_i = -alpha (S_iy - delta) over positives, N_c = log(1 + sum_{i neg} e^z_ic),
# P_c = log(1 + sum_{i: y_i = c} e^q_i). For upstream gradients g_P, g_N (C,) of the terms
#   dL/dS_ic (negative) = alpha g_N_c e^(z_ic - N_c)
#   dL/dS_iy (positive) = -alpha g_P_y e^(q_i - P_y)
# (the mean: g_P = 1 / |C+|, g_N = 1 / C). Both are final once the chunk holding class c has been
# seen: one sweep of all rows over the classes writes the gradients as it goes, in three GEMMs.


def _column_wise(x, w, labels, problem, reduction, chunk_elements, grads=None, known=None):
    """(P, N) (2, C), q and eq. 3's sum; grads.upstream is (g_P, g_N). known: the terms and q of
    an earlier forward (q is reused; P, O(N) work, and N_c, inside the chunk, are recomputed)."""
    c = problem.num_classes
    alpha = problem.alpha
    valid, index = _label_index(labels, c)
    q = _positive_logits(x, w, valid, index, problem, reduction) if known is None else known[1]
    # P_c as a log-sum-exp with a zero logit, scattered by label: m_c = max(0, max q), then the sum.
    m = q.new_zeros(c).scatter_reduce_(0, index, q, "amax")
    p = m.neg().exp_().index_add_(0, index, (q - m[index]).exp_()).log_().add_(m)
    dw = grads.dw if grads is not None else None
    if grads is not None:
        g_p, g_n = grads.upstream
        g_pos = (q - p[index]).exp_().mul_(g_p[index]).mul_(-alpha)
        g_neg = g_n * alpha
    per_chunk = _classes_per_chunk(chunk_elements, x.shape[0], problem, x.shape[1])
    proxies = _Proxies(w, problem, per_chunk)
    block = _Block(_scaled(x, reduction), labels, problem, reduction, proxies, per_chunk,
                   one_visit=True)
    negative = q.new_empty(c)
    regularizer = []
    for j in range(len(block.starts)):
        visit = block.visit(j)
        start, stop = visit.chunk.start, visit.chunk.stop
        n_c = block.column_lse(visit.z, negative[start:stop])
        if grads is not None:
            ds, vd = block.chunk_gradient(visit, g_pos, col_shift=n_c,
                                          col_weight=g_neg[start:stop])
            value = block.write_grads(visit, ds, vd, x, grads.dx, dw, True, grads.reg_weight)
            if value is not None:
                regularizer.append(value)
                continue
        regularizer.append(proxies.finish(visit.chunk, _proxy_rows(dw, visit.chunk, problem),
                                          grads.reg_weight if grads is not None else 0.0))
    return torch.stack([p, negative]), q, sum(regularizer)


# Row-wise (MPA-DW eq. 12, MPA-AP eq. 16, SoftTriple eq. 2, ProxyNCA as SoftTriple):
# z_ic = alpha (S_ic + delta_neg) over negatives, q_i = sign alpha (S_iy - delta) for the positive,
# lse_i = log sum e^ over the negatives (and q_i where it is in the log-sum-exp), no zero logit,
# and sample i's loss extra(q_i) + (softplus(lse_i) with a zero logit, else lse_i):
#   MPA-DW:     zero logit,              extra softplus(q)   (the positive term of eq. 12)
#   MPA-AP:     zero logit, q in the lse, extra 0
#   SoftTriple: q in the lse,             extra -q            (cross-entropy)
# For upstream gradients g_lse, g_extra (N,) of the terms
#   dL/dS_ic (negative) = alpha g_lse_i e^(z_ic - lse_i)
#   dL/dS_iy (positive) = sign alpha ([q in lse] g_lse_i e^(q_i - lse_i) + g_extra_i extra'(q_i))
# (the mean: g_lse = sigmoid(lse) / N with a zero logit, else 1 / N; g_extra = 1 / N).
# lse_i needs every class before any of row i's gradient exists. In the mean's forward the rows
# are swept in blocks: a block's chunks of classes are visited once for an online log-sum-exp,
# keeping their J and logits, and then again for the gradients, from what was kept: three GEMMs.
# The blocks are as large as ROW_BLOCK_BYTES allows (one block, all rows, where it holds them);
# where that would make them thinner than MIN_BLOCK_ROWS, whose GEMMs run slower than a fourth
# GEMM costs, all rows form one block that keeps nothing and recomputes each chunk on its second
# visit. The terms' backward has lse from its forward: one visit per chunk, which recomputes it.

_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default

_ROW_WISE = {
    # loss: (zero logit, q in the log-sum-exp)
    "mpa_dw": (True, False),
    "mpa_ap": (True, True),
    "soft_triple": (False, True),
    "proxy_nca": (False, True),
}


def _row_extra(loss: str, q: torch.Tensor):
    """extra(q) and extra'(q) of the table above."""
    if loss == "mpa_dw":
        # F.softplus is q itself above its threshold (20), so its derivative there is 1, not
        # sigmoid(q) = 1 - e^-q: the gradient of the value actually computed.
        return F.softplus(q), torch.sigmoid(q).masked_fill_(q > _SOFTPLUS_THRESHOLD, 1.0)
    if loss in ("soft_triple", "proxy_nca"):
        return -q, -torch.ones_like(q)
    return torch.zeros_like(q), torch.zeros_like(q)


@dataclass(frozen=True)
class _Kept:
    """What a row-wise block keeps of each chunk between its two visits, in the chunk's region of a
    store (numbers per row and class, and per class): J (k; none in the identity), the logit and
    1/Z (softmax); where there is room, the GEMM's output (k, for the projection's dot without a
    pass over the proxies) and the classes' Gram matrices (K x K, formed once)."""

    j: int
    inv_z: int
    raw: int = 0
    gram: int = 0

    @classmethod
    def least(cls, problem: _Problem, reduction) -> "_Kept":
        return cls(0 if isinstance(reduction, _Identity) else problem.k,
                   int(isinstance(reduction, _Softmax)))

    def per_row(self) -> int:
        return self.j + self.raw + 1 + self.inv_z

    def numbers(self, rows: int, classes: int) -> int:
        return classes * (rows * self.per_row() + self.gram)

    def views(self, region: torch.Tensor, n: int, m: int, k: int, kp: int) -> dict:
        """The parts of a chunk's region: (n, m*k), (n, m*k), (n, m), (n, m), (m, K, K)."""
        sizes = {"j": n * m * self.j, "raw": n * m * self.raw, "z": n * m,
                 "inv_z": n * m * self.inv_z, "gram": m * self.gram}
        shapes = {"j": (n, m * k), "raw": (n, m * k), "z": (n, m), "inv_z": (n, m),
                  "gram": (m, kp, kp)}
        parts, at = {}, 0
        for name, size in sizes.items():
            if size:
                parts[name] = region[at:at + size].view(shapes[name])
            at += size
        return parts


def _row_blocks(x: torch.Tensor, dw: torch.Tensor | None, problem: _Problem,
                reduction) -> tuple[int, str | None, _Kept]:
    """Rows per block of the row-wise sweep with gradients, where a block keeps what its second
    visit needs ("gradient": in the proxies' gradient buffer, "buffer", or None: it recomputes),
    and what it keeps."""
    n, d = x.shape
    kp = problem.proxies_per_class
    kept = _Kept.least(problem, reduction)
    # A chunk's rows of the proxies' gradient (m K d numbers) are written only by its second
    # visit, once what was kept is consumed: until then they hold all rows' J, logits and 1/Z
    # where those fit, which needs nothing beyond the gradient itself. Where there is room, the
    # GEMM's output too, with which the chunk is finished before its gradient is written (see
    # _Block.write_grads), so that its Gram matrices, formed on the first visit, can wait there
    # too.
    if (KEEP_IN_GRADIENT and dw is not None and dw.dtype == x.dtype
            and kept.numbers(n, 1) <= kp * d):
        if problem.normalise and not problem.averaged:
            for gram in ((kp * kp, 0) if problem.tau else (0,)):
                more = _Kept(kept.j, kept.inv_z, problem.k, gram)
                if more.numbers(n, 1) <= kp * d:
                    return n, "gradient", more
        return n, "gradient", kept
    rows = ROW_BLOCK_BYTES // (kept.numbers(1, problem.num_classes) * x.element_size())
    if rows >= n:
        return n, "buffer", kept
    if rows < MIN_BLOCK_ROWS:
        return n, None, kept  # one block that recomputes
    blocks = -(-n // rows)
    return -(-n // blocks), "buffer", kept


def _row_wise(x, w, labels, problem, reduction, chunk_elements, grads=None, known=None):
    """(lse, extra) (2, N), q and eq. 3's sum; grads.upstream(lo, hi, lse_b) gives (g_lse,
    g_extra) of rows [lo, hi). known: the terms and q of an earlier forward; the log-sum-exp
    visits are then skipped and the gradients' visits recompute their chunks."""
    n, c = x.shape[0], problem.num_classes
    with_q = _ROW_WISE[problem.loss][1]
    if known is None:
        valid, index = _label_index(labels, c)
        q = _positive_logits(x, w, valid, index, problem, reduction)
        lse = q.new_empty(n)
        extra, d_extra = _row_extra(problem.loss, q)
        extra.masked_fill_(~valid, 0.0)  # SoftTriple's -q is +inf there
    else:
        (lse, extra), q = known
        d_extra = _row_extra(problem.loss, q)[1]
    # The running max's floor: a row may have no logit yet (a chunk may hold nothing but its
    # positive, all -inf there), or none at all (MPA-DW with one class); e^(-inf - floor) = 0.
    floor = torch.finfo(x.dtype).min
    rows, keep, kept = (_row_blocks(x, grads.dw, problem, reduction)
                        if grads is not None and known is None
                        else (n, None, _Kept.least(problem, reduction)))
    # Chunks of as many classes as in the class sweep (a block's tiles are the smaller), so that the
    # proxies' side of a chunk stays bounded by the budget too.
    per_chunk = _classes_per_chunk(chunk_elements, n, problem, x.shape[1])
    proxies = _Proxies(w, problem, per_chunk)
    starts = range(0, c, per_chunk)
    store = None
    if keep == "gradient":
        kp = problem.proxies_per_class
        store = [grads.dw[s * kp:min(c, s + per_chunk) * kp].view(-1) for s in starts]
    elif keep == "buffer":
        flat = x.new_empty(kept.numbers(rows, c))
        store = [flat[kept.numbers(rows, s):kept.numbers(rows, min(c, s + per_chunk))]
                 for s in starts]
    xs = _scaled(x, reduction)
    regularizer = []
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        block = _Block(xs[lo:hi], labels[lo:hi], problem, reduction, proxies, per_chunk, store,
                       kept, in_gradient=keep == "gradient")
        q_b = q[lo:hi]
        visits = []
        if known is None:
            run_max = q_b.clamp_min(floor) if with_q else q_b.new_full(q_b.shape, floor)
            run_sum = (q_b - run_max).exp_() if with_q else q_b.new_zeros(q_b.shape)
            for j in range(len(starts)):
                visit = block.visit(j, (run_max, run_sum))
                if keep:
                    visits.append(visit)
                if grads is None:
                    regularizer.append(proxies.finish(visit.chunk, None))
            lse[lo:hi] = run_sum.log_().add_(run_max)
        if grads is None:
            continue
        lse_b = lse[lo:hi]
        g_lse, g_extra = grads.upstream(lo, hi, lse_b)
        norm = lse_b.clamp_min(floor)  # lse = -inf: a row without logits, e^(z - floor) = 0
        d_q = d_extra[lo:hi] * g_extra
        if with_q:
            d_q += (q_b - norm).exp_() * g_lse
        g_pos = d_q.mul_(problem.positive_sign * problem.alpha)
        row_weight = g_lse * problem.alpha
        dx_b = grads.dx[lo:hi] if grads.dx is not None else None
        for j in range(len(starts)):
            if keep:
                visit = visits[j]
                if problem.averaged:  # its class means were in a buffer that later chunks reused
                    visit.chunk = proxies.chunk(visit.chunk.start, visit.chunk.stop)
            else:
                visit = block.visit(j)
            ds, vd = block.chunk_gradient(visit, g_pos, row_shift=norm, row_weight=row_weight)
            value = block.write_grads(visit, ds, vd, x[lo:hi], dx_b, grads.dw, lo == 0,
                                      grads.reg_weight)
            if value is not None:
                regularizer.append(value)
            elif hi == n:
                regularizer.append(proxies.finish(
                    visit.chunk, _proxy_rows(grads.dw, visit.chunk, problem), grads.reg_weight))
        del visits
    return torch.stack([lse, extra]), q, sum(regularizer)


def _family(problem: _Problem):
    return _column_wise if problem.column_wise else _row_wise


def _mean_upstream(problem: _Problem, labels: torch.Tensor, like: torch.Tensor):
    """The upstream gradient that the mean (reduce_terms) gives the terms, in the family's form."""
    n, c = labels.shape[0], problem.num_classes
    if problem.column_wise:
        present = int(torch.count_nonzero(torch.bincount(labels, minlength=c)))
        return like.new_full((c,), 1.0 / present), like.new_full((c,), 1.0 / c)
    if _ROW_WISE[problem.loss][0]:  # d softplus(lse) / d lse
        return lambda lo, hi, lse_b: (torch.sigmoid(lse_b).div_(n), 1.0 / n)
    return lambda lo, hi, lse_b: (torch.full_like(lse_b, 1.0 / n), 1.0 / n)


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "backend='torch' computes its gradients analytically and cannot differentiate "
            "them again (create_graph=True, double backward); use backend='reference' for "
            "higher-order gradients")


class _ChunkedProxyLoss(torch.autograd.Function):
    """The scalar loss (the mean) from x_hat (N, d) and the proxies (C*K, d), raw or unit as the
    problem says. Both families form the gradients during the forward (for a grad_output of 1)
    when they are wanted; the backward scales them. Differentiable once: the gradients are
    numbers, not a graph, so a double backward is refused."""

    @staticmethod
    def forward(ctx, x, w, labels, problem, chunk_elements, want_dx, want_dw):
        reduction = _reduction(problem, x.dtype)
        grads = dx = dw = None
        if want_dx or want_dw:
            # Contiguous whatever the inputs' layouts: the chunks' gradients are views of these.
            dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device) if want_dx else None
            dw = _gradient_buffer(w) if want_dw else None
            grads = _Grads(dx, dw, _mean_upstream(problem, labels, x), problem.tau)
        terms, _, regularizer = _family(problem)(
            x, w, labels, problem, reduction, chunk_elements, grads)
        # Saved (not kept on ctx) so that autograd frees them with the graph.
        ctx.save_for_backward(dx, dw)
        return reduce_terms(terms, labels, problem.spec, "mean") + problem.tau * regularizer

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_double_backward()
        dx, dw = ctx.saved_tensors
        scale = float(grad_output)
        if scale != 1.0:  # out of place: a second backward (retain_graph) scales the saved ones
            dx = dx * scale if dx is not None else None
            dw = torch.mul(dw, scale, out=_gradient_buffer(dw)) if dw is not None else None
        return dx, dw, None, None, None, None, None


class _ChunkedTerms(torch.autograd.Function):
    """The terms and eq. 3's sum (0-dim; 0 where there is none). The forward is the sweep without
    gradients, one GEMM; the backward, once the upstream gradients are known, is the sweep with
    them, recomputing s chunk by chunk: three GEMMs more. Kept in between: O(N + C) numbers (the
    terms, q). Differentiable once, as the mean's path."""

    @staticmethod
    def forward(ctx, x, w, labels, problem, chunk_elements):
        terms, q, regularizer = _family(problem)(
            x, w, labels, problem, _reduction(problem, x.dtype), chunk_elements)
        ctx.problem, ctx.chunk_elements = problem, chunk_elements
        ctx.save_for_backward(x, w, labels, terms, q)
        return terms, torch.as_tensor(regularizer, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, g_terms, g_regularizer):
        _refuse_double_backward()
        x, w, labels, terms, q = ctx.saved_tensors
        problem = ctx.problem
        want_dx, want_dw = ctx.needs_input_grad[:2]
        dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device) if want_dx else None
        dw = _gradient_buffer(w) if want_dw else None
        if problem.column_wise:
            upstream = (g_terms[0], g_terms[1])
        else:
            def upstream(lo, hi, lse_b):
                return g_terms[0, lo:hi], g_terms[1, lo:hi]
        grads = _Grads(dx, dw, upstream, float(g_regularizer))
        _family(problem)(x, w, labels, problem, _reduction(problem, x.dtype), ctx.chunk_elements,
                         grads, (terms, q))
        return dx, dw, None, None, None
