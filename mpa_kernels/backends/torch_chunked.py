"""The ``"torch"`` backend: chunked, analytic forward and backward in plain PyTorch ops, for CPUs.

The similarity tensor ``s = x_hat @ w_hat.T`` (N x C*K) is never materialised. Classes are swept in
chunks of whole classes; per chunk one GEMM gives ``s`` for every sample, the intra-class reduction
turns it into ``S`` (N x chunk), and the loss needs only ``O(N + C)`` statistics of ``S``:

* column-wise family (MPA, ProxyAnchor): a class's log-sum-exp runs over samples, and every chunk
  holds all N samples, so a class's statistics, and with them its gradient, are final inside its
  chunk. When a gradient is wanted the forward sweep also writes it: ``ds`` for the chunk, then
  ``dw[chunk] = ds.T @ x_hat`` and ``dx += ds @ w_chunk``. Three GEMMs in all, the floor; the
  backward only hands them out (scaled by grad_output). Under ``torch.no_grad`` or with inputs that
  do not require grad, the forward is the one GEMM.
* row-wise family (MPA-DW, MPA-AP, SoftTriple, ProxyNCA): a sample's log-sum-exp runs over all
  classes, so the forward sweep keeps an online log-sum-exp per sample (running max and sum), and
  the backward sweep recomputes each chunk's ``s`` (a fourth GEMM) to form ``ds`` with the final
  per-sample statistics. Keeping ``s`` instead would cost N*C*K memory.

Positive pairs are few (one per sample): their similarities ``S_{i,y_i}`` come from a gather of the
K proxies of each sample's class (``N*K*d``), their terms are evaluated on ``(N,)`` vectors, and their
gradients are written into the chunk's ``dL/dS`` at the positive entries, so that they ride on the
chunk GEMMs like every other entry. Inside a chunk the positive entries are masked out of the
negatives' log-sum-exp with ``-inf``, which also makes their share of ``exp(z - lse)`` exactly zero.

Raw proxies (:func:`proxy_loss`): the proxies' normalisation and the regulariser of eq. 3 ride on
the same sweep. Each chunk's rows are normalised into a chunk buffer (the GEMMs' operand), the
regulariser's share of the chunk's classes is summed there, and the proxies' gradient is formed
per chunk, ``dw_hat = ds.T @ x_hat`` plus the regulariser's, projected through the normalisation
straight into the one gradient buffer of the raw proxies. No tensor of the proxies' size exists but
the proxies and their gradient. :func:`similarity_loss` (proxies already unit, no regulariser) is
the same sweep without the normalisation.

Memory above the inputs and the gradients: two chunk buffers of ``chunk_elements`` elements (the
default :data:`DEFAULT_CHUNK_ELEMENTS`; a chunk holds at least one class, so the bound is
``max(chunk_elements, N*K)``), a few ``N x chunk`` similarity-level tensors, ``O(N + C)`` vectors,
the chunk's normalised proxies (``chunk_elements / N * d`` elements) and, for the row-wise family
with the regulariser, its ``C*K*K`` gradient matrices kept from the forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mpa_kernels._spec import LossSpec
# The front end's constants, so that the fused normalisation and regulariser are the unfused ones.
from mpa_kernels.functional import _NORM_EPS, _REGULARIZER_EPS

LOW_PRECISION = False

# Elements of one chunk of s (N x classes x K). 2^17 fp32 elements (512 KiB, two buffers 1 MiB) keep
# a chunk in this machine's 2 MiB of L2 per core, which makes the chunked GEMMs faster than the
# whole N x C*K ones (measured, two threads: 0.36 s against 0.48 s for the three GEMMs at N=180,
# C=11318, K=10, d=512); 2^16 to 2^19 time alike on one thread, 2^15 is 10% slower.
# Read at call time, so tests can lower it to force many chunks.
DEFAULT_CHUNK_ELEMENTS = 1 << 17


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


def _loss(x_hat, w, labels, spec, tau, normalise, chunk_elements):
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    problem = _Problem.of(spec, tau, normalise)
    want = torch.is_grad_enabled()
    return _ChunkedProxyLoss.apply(
        x_hat, w, labels, problem, chunk_elements,
        want and x_hat.requires_grad, want and w.requires_grad,
    )


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
    tau: float  # weight of eq. 3; 0 where there is none to add (K == 1 included)
    normalise: bool  # the proxies are raw rows, to be scaled to unit norm

    @classmethod
    def of(cls, spec: LossSpec, tau: float, normalise: bool) -> "_Problem":
        k = spec.proxies_per_class
        # mean_k (x . w_ck) = x . mean_k(w_ck): the mean mode is the one-proxy problem on the
        # classes' averaged unit proxies, K times cheaper.
        k_gemm = 1 if spec.similarity == "mean" else k
        similarity = spec.similarity if k_gemm > 1 else "identity"
        return cls(spec.loss, spec.column_wise, spec.num_classes, k, k_gemm, similarity,
                   spec.alpha, spec.delta, spec.gamma, float(tau) if k > 1 else 0.0, normalise)

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
# Each reduction maps a chunk t (N, m, K) of the GEMM's output to S (N, m) and back: ``forward``
# may overwrite t (the buffer is the chunk's own) and returns S and what ``backward`` needs;
# ``backward(G)`` turns G = dL/dS into ds = dL/ds, written over t's buffer where it can.


class _Softmax:
    """S = sum_k p_k s_k, p = softmax_k(s / gamma).

    The GEMM is fed x_hat / gamma, so it yields t = s / gamma directly. Since |s| <= 1, exp(t) lies
    in [e^(-1/gamma), e^(1/gamma)]; when that range fits the dtype, no max is subtracted (the
    shift cancels in p and saves a reduction and a pass). h = S / gamma = sum_k e_k t_k / sum_k e_k.

    Gradient: dS/ds_k = p_k (1 + (s_k - S) / gamma) = (e_k / Z)(1 + t_k - h), so
    ds_k = G (e_k / Z)(t_k + 1 - h) = a (e_k t_k) + a (1 - h) e_k with a = G / Z: two in-place
    passes over the product e * t that the forward already holds in t's buffer.
    """

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
        z = e.sum(-1)
        et = t.mul_(e)
        h = et.sum(-1).div_(z)
        return h * self.gamma, (et, e, z, h)

    @staticmethod
    def backward(g: torch.Tensor, state) -> torch.Tensor:
        et, e, z, h = state
        a = g / z
        b = h.neg_().add_(1.0).mul_(a)
        return et.mul_(a.unsqueeze(-1)).addcmul_(e, b.unsqueeze(-1))


class _Max:
    """S = max_k s_k; the whole gradient goes to the argmax (the same tie-break as the
    reference's ``max(dim)``)."""

    x_scale = 1.0

    def forward(self, t: torch.Tensor, e: torch.Tensor):
        values, index = t.max(-1)
        return values, (t, index)

    @staticmethod
    def backward(g: torch.Tensor, state) -> torch.Tensor:
        t, index = state
        return t.zero_().scatter_(-1, index.unsqueeze(-1), g.unsqueeze(-1))


class _Identity:
    """K = 1: S = s and ds = G."""

    x_scale = 1.0

    def forward(self, t: torch.Tensor, e: torch.Tensor):
        return t.squeeze(-1), None

    @staticmethod
    def backward(g: torch.Tensor, state) -> torch.Tensor:
        return g


def _reduction(problem: _Problem, dtype: torch.dtype):
    if problem.similarity == "softmax":
        return _Softmax(problem.gamma, problem.k, dtype)
    return _Max() if problem.similarity == "max" else _Identity()


# --- the proxies of a chunk: normalisation, averaging, regulariser ------------------------------
#
# Unit rows u = v / max(||v||, eps). Gradient (as F.normalize's): du -> dv = (du - u (u . du)) / ||v||,
# and du / eps for a row whose norm was clamped (there u = v / eps is linear in v).
#
# Regulariser (eq. 3): R = a sum_c sum_{t<s} sqrt(2 - 2 min(u_ct . u_cs, 1) + eps), a = 1/(C K (K-1)).
# d sqrt(2 - 2 m + eps) / d m = -1 / sqrt(2 - 2 m + eps), and the clamp passes the gradient where
# m <= 1 (torch's clamp includes its bound). A pair {t, s} is summed once but its term depends on
# both u_ct (through u_cs) and u_cs (through u_ct), so with the symmetric K x K matrix
#   G_ts = G_st = -a / sqrt(2 - 2 m_ts + eps)  (t != s, m_ts <= 1),  0 elsewhere (diagonal too),
# dR/dU_c = G U_c: one batched (K x K) @ (K x d) product per class, no factor 2.
#
# Mean mode: the GEMMs see wbar_c = mean_k u_ck, so du_ck = dwbar_c / K for every k.


def _unit_rows(w_chunk: torch.Tensor, out: torch.Tensor):
    """w_chunk's rows scaled to unit norm, into out; with the 1/||v|| and the unclamped mask."""
    norm = torch.linalg.vector_norm(w_chunk, dim=1, keepdim=True)
    unclamped = norm > _NORM_EPS
    inv = norm.clamp_min_(_NORM_EPS).reciprocal_()
    return torch.mul(w_chunk, inv, out=out), inv, unclamped


def _regularizer(u: torch.Tensor, problem: _Problem, grad_scale: float | None):
    """Eq. 3's sum over the chunk's classes (a included) from their unit proxies u (m*K, d), and
    with grad_scale the matrix grad_scale * G (m, K, K) of the derivation above."""
    k = problem.proxies_per_class
    u3 = u.view(-1, k, u.shape[1])
    sims = torch.bmm(u3, u3.transpose(1, 2))
    # 2 (1 - m) + eps, in that order: 2 + eps rounds to 2 in fp32, which would make the distance of
    # two identical proxies 0 and its reciprocal below inf. 2 (1 - m) rounds exactly as 2 - 2 m.
    dist = sims.clamp(max=1.0).neg_().add_(1.0).mul_(2.0).add_(_REGULARIZER_EPS).sqrt_()
    a = 1.0 / (problem.num_classes * k * (k - 1))
    upper = torch.ones(k, k, dtype=torch.bool, device=u.device).triu_(1)
    value = dist[:, upper].sum() * a
    if grad_scale is None:
        return value, None
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=u.device)
    # A select, not a product with the mask: in fp32 the eps vanishes next to 2 and the
    # diagonal's distance is 0, its reciprocal inf.
    g = torch.where((sims <= 1.0) & off_diagonal, dist.reciprocal_(), 0.0).mul_(-a * grad_scale)
    return value, g


# --- the sweep over class chunks ----------------------------------------------------------------


@dataclass
class _Chunk:
    start: int  # first class
    stop: int
    u: torch.Tensor  # its unit proxies, (m*K, d)
    inv: torch.Tensor | None  # 1/||v|| of its raw proxies, (m*K, 1), when they were normalised
    unclamped: torch.Tensor | None  # ||v|| > eps, (m*K, 1)
    w: torch.Tensor  # the rows the GEMM saw, (m*k, d): u, or its class means in the mean mode
    rows: torch.Tensor  # samples whose positive class is in the chunk
    cols: torch.Tensor  # and that class, relative to start
    s: torch.Tensor  # S, (N, m)
    state: object  # for the reduction's backward


def _sweep(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, problem: _Problem,
           reduction, chunk_elements: int):
    """Yield the chunks of classes with their S; one GEMM each, in reused buffers."""
    n, k, c = x.shape[0], problem.k, problem.num_classes
    kp, d = problem.proxies_per_class, w.shape[1]
    per_chunk = min(c, max(1, chunk_elements // (n * k)))
    xs = x * reduction.x_scale if reduction.x_scale != 1.0 else x
    t_buf = x.new_empty(n * per_chunk * k)
    e_buf = torch.empty_like(t_buf) if isinstance(reduction, _Softmax) else None
    u_buf = w.new_empty(per_chunk * kp * d) if problem.normalise else None
    mean_buf = w.new_empty(per_chunk * d) if problem.averaged else None
    # Samples sorted by label: those whose positive lies in a chunk are one slice of the order.
    sorted_labels, order = torch.sort(labels, stable=True)
    starts = list(range(0, c, per_chunk))
    cuts = torch.searchsorted(sorted_labels, torch.tensor(starts + [c])).tolist()
    for j, start in enumerate(starts):
        stop = min(c, start + per_chunk)
        m = stop - start
        u, inv, unclamped = w[start * kp:stop * kp], None, None
        if problem.normalise:
            u, inv, unclamped = _unit_rows(u, u_buf[:m * kp * d].view(m * kp, d))
        w_chunk = u
        if problem.averaged:
            w_chunk = torch.mean(u.view(m, kp, d), 1, out=mean_buf[:m * d].view(m, d))
        size = n * m * k
        t = torch.mm(xs, w_chunk.T, out=t_buf[:size].view(n, -1)).view(n, -1, k)
        e = e_buf[:size].view(t.shape) if e_buf is not None else None
        s, state = reduction.forward(t, e)
        lo, hi = cuts[j], cuts[j + 1]
        yield _Chunk(start, stop, u, inv, unclamped, w_chunk, order[lo:hi],
                     sorted_labels[lo:hi] - start, s, state)


def _negative_logits(chunk: _Chunk, problem: _Problem) -> torch.Tensor:
    """z = alpha (S + delta_neg) over the chunk, -inf at the positive entries."""
    z = torch.add(chunk.s, problem.negative_delta).mul_(problem.alpha)
    return z.index_put_((chunk.rows, chunk.cols), z.new_tensor(float("-inf")))


def _write_chunk_grads(chunk: _Chunk, g: torch.Tensor, reduction, x: torch.Tensor,
                       dx: torch.Tensor | None, dw: torch.Tensor | None, problem: _Problem,
                       g_reg: torch.Tensor | None, reg_scale: float = 1.0) -> None:
    """G = dL/dS of the chunk -> ds -> dx += ds w[chunk] and the raw proxies' dw[chunk]: ds.T x,
    spread over the K proxies in the mean mode, plus reg_scale * g_reg @ u (the regulariser's,
    g_reg from :func:`_regularizer`), through the normalisation."""
    ds = reduction.backward(g, chunk.state).reshape(x.shape[0], -1)
    if dx is not None:
        dx.addmm_(ds, chunk.w)
    if dw is None:
        return
    kp = problem.proxies_per_class
    du = dw[chunk.start * kp:chunk.stop * kp]
    if problem.averaged:
        dwbar = torch.mm(ds.T, x).div_(kp)
        du.view(-1, kp, x.shape[1]).copy_(dwbar.unsqueeze(1))
    else:
        torch.mm(ds.T, x, out=du)
    if g_reg is not None:
        du3 = du.view(-1, kp, x.shape[1])
        du3.baddbmm_(g_reg, chunk.u.view(du3.shape), alpha=reg_scale)
    if problem.normalise:
        dot = torch.linalg.vecdot(chunk.u, du, dim=1).unsqueeze(1).mul_(chunk.unclamped)
        du.addcmul_(chunk.u, dot, value=-1.0).mul_(chunk.inv)


def _positive_similarity(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                         problem: _Problem, reduction) -> torch.Tensor:
    """S_{i, y_i} for every sample, (N,): a gather of its class's K proxies, N*K*d work."""
    kp, d = problem.proxies_per_class, w.shape[1]
    w_pos = w.view(problem.num_classes, kp, d)[labels].view(-1, d)  # (N*K, d)
    if problem.normalise:
        w_pos, _, _ = _unit_rows(w_pos, torch.empty_like(w_pos))
    w_pos = w_pos.view(-1, kp, d)
    if problem.averaged:
        w_pos = w_pos.mean(1, keepdim=True)
    t = torch.bmm(w_pos, (x * reduction.x_scale).unsqueeze(-1)).view(x.shape[0], 1, problem.k)
    s, _ = reduction.forward(t, torch.empty_like(t))
    return s.view(-1)


# --- the two families ---------------------------------------------------------------------------
#
# Column-wise (MPA, eq. 6; ProxyAnchor): z_ic = alpha (S_ic + delta) over negatives,
# q_i = -alpha (S_iy - delta) over positives, N_c = log(1 + sum_{i neg} e^z_ic),
# P_c = log(1 + sum_{i: y_i = c} e^q_i), L = sum_{c in C+} P_c / |C+| + sum_c N_c / C.
#   dL/dS_ic (negative) = (alpha / C) e^(z_ic - N_c)
#   dL/dS_iy (positive) = -(alpha / |C+|) e^(q_i - P_y)
# Both are final once the chunk holding class c has been seen.


def _column_wise_forward(x, w, labels, problem, reduction, chunk_elements, dx, dw):
    c = problem.num_classes
    alpha, delta = problem.alpha, problem.delta
    q = -alpha * (_positive_similarity(x, w, labels, problem, reduction) - delta)
    # P_c as a log-sum-exp with a zero logit, scattered by label: m_c = max(0, max q), then the sum.
    m = q.new_zeros(c).scatter_reduce_(0, labels, q, "amax")
    p = m.neg().exp_().index_add_(0, labels, (q - m[labels]).exp_()).log_().add_(m)
    num_present = int(torch.count_nonzero(torch.bincount(labels, minlength=c)))
    g_pos = (q - p[labels]).exp_().mul_(-alpha / num_present)
    negative = q.new_empty(c)
    regularizer = []
    want_grads = dx is not None or dw is not None
    for chunk in _sweep(x, w, labels, problem, reduction, chunk_elements):
        g_reg = None
        if problem.tau:
            value, g_reg = _regularizer(chunk.u, problem, problem.tau if dw is not None else None)
            regularizer.append(value)
        z = _negative_logits(chunk, problem)
        zmax = z.amax(0).clamp_min_(0.0)  # the zero logit takes part in the max
        ez = z.sub_(zmax).exp_()
        n_c = ez.sum(0).add_(zmax.neg().exp_()).log_().add_(zmax)
        negative[chunk.start:chunk.stop] = n_c
        if want_grads:
            # e^(z - N_c) = ez e^(zmax - N_c); the positive entries of ez are 0, g_pos goes there.
            g = ez.mul_(zmax.sub_(n_c).exp_().mul_(alpha / c))
            g.index_put_((chunk.rows, chunk.cols), g_pos[chunk.rows])
            _write_chunk_grads(chunk, g, reduction, x, dx, dw, problem, g_reg)
    return p.sum() / num_present + negative.sum() / c + _weighted_sum(regularizer, problem.tau)


def _weighted_sum(terms: list[torch.Tensor], weight: float):
    return weight * torch.stack(terms).sum() if terms else 0.0


# Row-wise (MPA-DW eq. 12, MPA-AP eq. 16, SoftTriple eq. 2, ProxyNCA as SoftTriple):
# z_ic = alpha (S_ic + delta_neg) over negatives, q_i = sign alpha (S_iy - delta) for the positive,
# lse_i = log(sum of e^ over the base logits and the negatives), L = mean_i (lse_i + extra(q_i)).
#   MPA-DW:     base {0},    extra softplus(q)     (softplus is the positive term of eq. 12)
#   MPA-AP:     base {0, q}, extra 0
#   SoftTriple: base {q},    extra -q              (cross-entropy)
#   dL/dS_ic (negative) = (alpha / N) e^(z_ic - lse_i)
#   dL/dS_iy (positive) = sign alpha / N * ([q in base] e^(q_i - lse_i) + extra'(q_i))
# lse_i needs every class, so the gradient waits for the backward sweep.

_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default

_ROW_WISE = {
    # loss: (zero logit in base, q in base)
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


def _row_wise_forward(x, w, labels, problem, reduction, chunk_elements, g_reg_all):
    with_zero, with_q = _ROW_WISE[problem.loss]
    q = problem.positive_sign * problem.alpha * (
        _positive_similarity(x, w, labels, problem, reduction) - problem.delta)
    # The online log-sum-exp starts from the base logits, so its running max is finite from the
    # first chunk on (a chunk may hold nothing but a sample's positive, all -inf for that row).
    base = [q.new_zeros(q.shape)] * with_zero + [q] * with_q
    run_max = torch.stack(base).amax(0)
    run_sum = sum((b - run_max).exp_() for b in base)
    regularizer = []
    for chunk in _sweep(x, w, labels, problem, reduction, chunk_elements):
        if problem.tau:
            # The regulariser's gradient matrix is kept for the backward (C*K*K elements, K/d of
            # the proxies' size), which spares it a second batched product over all proxies.
            value, g_reg = _regularizer(chunk.u, problem,
                                        problem.tau if g_reg_all is not None else None)
            regularizer.append(value)
            if g_reg is not None:
                g_reg_all[chunk.start:chunk.stop] = g_reg
        z = _negative_logits(chunk, problem)
        new_max = torch.maximum(run_max, z.amax(1))
        run_sum = run_sum.mul_(run_max.sub_(new_max).exp_()).add_(
            z.sub_(new_max.unsqueeze(1)).exp_().sum(1))
        run_max = new_max
    lse = run_sum.log_().add_(run_max)
    extra, _ = _row_extra(problem.loss, q)
    return (lse + extra).mean() + _weighted_sum(regularizer, problem.tau), q, lse


def _row_wise_backward(x, w, labels, problem, reduction, chunk_elements, q, lse, g_reg_all, scale,
                       dx, dw):
    _, with_q = _ROW_WISE[problem.loss]
    _, d_extra = _row_extra(problem.loss, q)
    coef = problem.alpha * scale / x.shape[0]
    d_q = d_extra.add_((q - lse).exp_()) if with_q else d_extra
    g_pos = d_q.mul_(problem.positive_sign * coef)
    for chunk in _sweep(x, w, labels, problem, reduction, chunk_elements):
        g = _negative_logits(chunk, problem).sub_(lse.unsqueeze(1)).exp_().mul_(coef)
        g.index_put_((chunk.rows, chunk.cols), g_pos[chunk.rows])
        g_reg = g_reg_all[chunk.start:chunk.stop] if g_reg_all is not None else None
        _write_chunk_grads(chunk, g, reduction, x, dx, dw, problem, g_reg, scale)


class _ChunkedProxyLoss(torch.autograd.Function):
    """The scalar loss from x_hat (N, d) and the proxies (C*K, d), raw or unit as the problem
    says, with analytic gradients."""

    @staticmethod
    def forward(ctx, x, w, labels, problem, chunk_elements, want_dx, want_dw):
        reduction = _reduction(problem, x.dtype)
        ctx.problem, ctx.chunk_elements = problem, chunk_elements
        if problem.column_wise:
            # The gradient is final inside each chunk: computed here, for a grad_output of 1.
            dx = torch.zeros_like(x) if want_dx else None
            dw = torch.empty_like(w) if want_dw else None
            loss = _column_wise_forward(x, w, labels, problem, reduction, chunk_elements, dx, dw)
            # Saved (not kept on ctx) so that autograd frees them with the graph.
            ctx.save_for_backward(dx, dw)
        else:
            k = problem.proxies_per_class
            g_reg_all = w.new_empty(problem.num_classes, k, k) if problem.tau and want_dw else None
            loss, q, lse = _row_wise_forward(x, w, labels, problem, reduction, chunk_elements,
                                             g_reg_all)
            ctx.save_for_backward(x, w, labels, q, lse, g_reg_all)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        problem = ctx.problem
        scale = float(grad_output)
        if problem.column_wise:
            dx, dw = ctx.saved_tensors
            if scale != 1.0:
                dx = dx * scale if dx is not None else None
                dw = dw * scale if dw is not None else None
        else:
            x, w, labels, q, lse, g_reg_all = ctx.saved_tensors
            dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
            dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
            if dx is not None or dw is not None:
                _row_wise_backward(x, w, labels, problem, _reduction(problem, x.dtype),
                                   ctx.chunk_elements, q, lse, g_reg_all, scale, dx, dw)
        return dx, dw, None, None, None, None, None
