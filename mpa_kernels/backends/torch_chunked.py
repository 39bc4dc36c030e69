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

Memory above the inputs and the gradients: two chunk buffers of ``chunk_elements`` elements (the
default :data:`DEFAULT_CHUNK_ELEMENTS`; a chunk holds at least one class, so the bound is
``max(chunk_elements, N*K)``), a few ``N x chunk`` similarity-level tensors and ``O(N + C)`` vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mpa_kernels._spec import LossSpec

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
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    k = spec.proxies_per_class
    similarity = spec.similarity
    if similarity == "mean" and k > 1:
        # mean_k (x . w_ck) = x . mean_k(w_ck): the mean mode is the one-proxy problem on averaged
        # proxies, K times cheaper; autograd spreads the proxies' gradient back (1/K to each).
        w_hat = w_hat.view(spec.num_classes, k, -1).mean(1)
        k = 1
    problem = _Problem.of(spec, k, similarity if k > 1 else "identity")
    want = torch.is_grad_enabled()
    return _ChunkedSimilarityLoss.apply(
        x_hat, w_hat, labels, problem, chunk_elements,
        want and x_hat.requires_grad, want and w_hat.requires_grad,
    )


@dataclass(frozen=True)
class _Problem:
    """The loss as the sweep needs it: its family, the constants of its logits, the reduction."""

    loss: str
    column_wise: bool
    num_classes: int
    k: int
    similarity: str  # "softmax", "max", or "identity" (K == 1, or the mean mode reduced to it)
    alpha: float
    delta: float
    gamma: float

    @classmethod
    def of(cls, spec: LossSpec, k: int, similarity: str) -> "_Problem":
        return cls(spec.loss, spec.column_wise, spec.num_classes, k, similarity, spec.alpha,
                   spec.delta, spec.gamma)

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


# --- the sweep over class chunks ----------------------------------------------------------------


@dataclass
class _Chunk:
    start: int  # first class
    stop: int
    w: torch.Tensor  # its proxies, (m*K, d)
    rows: torch.Tensor  # samples whose positive class is in the chunk
    cols: torch.Tensor  # and that class, relative to start
    s: torch.Tensor  # S, (N, m)
    state: object  # for the reduction's backward


def _sweep(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, problem: _Problem,
           reduction, chunk_elements: int):
    """Yield the chunks of classes with their S; one GEMM each, in two reused buffers."""
    n, k, c = x.shape[0], problem.k, problem.num_classes
    per_chunk = min(c, max(1, chunk_elements // (n * k)))
    xs = x * reduction.x_scale if reduction.x_scale != 1.0 else x
    t_buf = x.new_empty(n * per_chunk * k)
    e_buf = torch.empty_like(t_buf) if isinstance(reduction, _Softmax) else None
    # Samples sorted by label: those whose positive lies in a chunk are one slice of the order.
    sorted_labels, order = torch.sort(labels, stable=True)
    starts = list(range(0, c, per_chunk))
    cuts = torch.searchsorted(sorted_labels, torch.tensor(starts + [c])).tolist()
    for j, start in enumerate(starts):
        stop = min(c, start + per_chunk)
        size = n * (stop - start) * k
        w_chunk = w[start * k:stop * k]
        t = torch.mm(xs, w_chunk.T, out=t_buf[:size].view(n, -1)).view(n, -1, k)
        e = e_buf[:size].view(t.shape) if e_buf is not None else None
        s, state = reduction.forward(t, e)
        lo, hi = cuts[j], cuts[j + 1]
        yield _Chunk(start, stop, w_chunk, order[lo:hi], sorted_labels[lo:hi] - start, s, state)


def _negative_logits(chunk: _Chunk, problem: _Problem) -> torch.Tensor:
    """z = alpha (S + delta_neg) over the chunk, -inf at the positive entries."""
    z = torch.add(chunk.s, problem.negative_delta).mul_(problem.alpha)
    return z.index_put_((chunk.rows, chunk.cols), z.new_tensor(float("-inf")))


def _write_chunk_grads(chunk: _Chunk, g: torch.Tensor, reduction, x: torch.Tensor,
                       dx: torch.Tensor | None, dw: torch.Tensor | None, k: int) -> None:
    """G = dL/dS of the chunk -> ds -> dw[chunk] = ds.T x and dx += ds w[chunk]."""
    ds = reduction.backward(g, chunk.state).reshape(x.shape[0], -1)
    if dw is not None:
        torch.mm(ds.T, x, out=dw[chunk.start * k:chunk.stop * k])
    if dx is not None:
        dx.addmm_(ds, chunk.w)


def _positive_similarity(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                         problem: _Problem, reduction) -> torch.Tensor:
    """S_{i, y_i} for every sample, (N,): a gather of its class's K proxies, N*K*d work."""
    w_pos = w.view(problem.num_classes, problem.k, -1)[labels]  # (N, K, d)
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
    want_grads = dx is not None or dw is not None
    for chunk in _sweep(x, w, labels, problem, reduction, chunk_elements):
        z = _negative_logits(chunk, problem)
        zmax = z.amax(0).clamp_min_(0.0)  # the zero logit takes part in the max
        ez = z.sub_(zmax).exp_()
        n_c = ez.sum(0).add_(zmax.neg().exp_()).log_().add_(zmax)
        negative[chunk.start:chunk.stop] = n_c
        if want_grads:
            # e^(z - N_c) = ez e^(zmax - N_c); the positive entries of ez are 0, g_pos goes there.
            g = ez.mul_(zmax.sub_(n_c).exp_().mul_(alpha / c))
            g.index_put_((chunk.rows, chunk.cols), g_pos[chunk.rows])
            _write_chunk_grads(chunk, g, reduction, x, dx, dw, problem.k)
    return p.sum() / num_present + negative.sum() / c


# Row-wise (MPA-DW eq. 12, MPA-AP eq. 16, SoftTriple eq. 2, ProxyNCA as SoftTriple):
# z_ic = alpha (S_ic + delta_neg) over negatives, q_i = sign alpha (S_iy - delta) for the positive,
# lse_i = log(sum of e^ over the base logits and the negatives), L = mean_i (lse_i + extra(q_i)).
#   MPA-DW:     base {0},    extra softplus(q)     (softplus is the positive term of eq. 12)
#   MPA-AP:     base {0, q}, extra 0
#   SoftTriple: base {q},    extra -q              (cross-entropy)
#   dL/dS_ic (negative) = (alpha / N) e^(z_ic - lse_i)
#   dL/dS_iy (positive) = sign alpha / N * ([q in base] e^(q_i - lse_i) + extra'(q_i))
# lse_i needs every class, so the gradient waits for the backward sweep.

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
        return F.softplus(q), torch.sigmoid(q)
    if loss in ("soft_triple", "proxy_nca"):
        return -q, -torch.ones_like(q)
    return torch.zeros_like(q), torch.zeros_like(q)


def _row_wise_forward(x, w, labels, problem, reduction, chunk_elements):
    with_zero, with_q = _ROW_WISE[problem.loss]
    q = problem.positive_sign * problem.alpha * (
        _positive_similarity(x, w, labels, problem, reduction) - problem.delta)
    # The online log-sum-exp starts from the base logits, so its running max is finite from the
    # first chunk on (a chunk may hold nothing but a sample's positive, all -inf for that row).
    base = [q.new_zeros(q.shape)] * with_zero + [q] * with_q
    run_max = torch.stack(base).amax(0)
    run_sum = sum((b - run_max).exp_() for b in base)
    for chunk in _sweep(x, w, labels, problem, reduction, chunk_elements):
        z = _negative_logits(chunk, problem)
        new_max = torch.maximum(run_max, z.amax(1))
        run_sum = run_sum.mul_(run_max.sub_(new_max).exp_()).add_(
            z.sub_(new_max.unsqueeze(1)).exp_().sum(1))
        run_max = new_max
    lse = run_sum.log_().add_(run_max)
    extra, _ = _row_extra(problem.loss, q)
    return (lse + extra).mean(), q, lse


def _row_wise_backward(x, w, labels, problem, reduction, chunk_elements, q, lse, scale, dx, dw):
    _, with_q = _ROW_WISE[problem.loss]
    _, d_extra = _row_extra(problem.loss, q)
    coef = problem.alpha * scale / x.shape[0]
    d_q = d_extra.add_((q - lse).exp_()) if with_q else d_extra
    g_pos = d_q.mul_(problem.positive_sign * coef)
    for chunk in _sweep(x, w, labels, problem, reduction, chunk_elements):
        g = _negative_logits(chunk, problem).sub_(lse.unsqueeze(1)).exp_().mul_(coef)
        g.index_put_((chunk.rows, chunk.cols), g_pos[chunk.rows])
        _write_chunk_grads(chunk, g, reduction, x, dx, dw, problem.k)


class _ChunkedSimilarityLoss(torch.autograd.Function):
    """The scalar similarity loss from x_hat (N, d) and w_hat (C*K, d), with analytic gradients."""

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
            loss, q, lse = _row_wise_forward(x, w, labels, problem, reduction, chunk_elements)
            ctx.save_for_backward(x, w, labels, q, lse)
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
            x, w, labels, q, lse = ctx.saved_tensors
            dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
            dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
            if dx is not None or dw is not None:
                _row_wise_backward(x, w, labels, problem, _reduction(problem, x.dtype),
                                   ctx.chunk_elements, q, lse, scale, dx, dw)
        return dx, dw, None, None, None, None, None
