"""Triton device helpers shared by every loss kernel.

Both kernel levels import these: the kernels over a materialised similarity tensor
(:mod:`mpa_kernels.kernels.similarity`) and the fused-linear kernels that compute tiles of
``x_hat @ w_hat.T`` themselves (:mod:`mpa_kernels.kernels.linear`). They are ``@triton.jit``
functions, inlined into the caller, that work on register tiles in fp32; loading, masking of
out-of-range rows and classes, and storing stay with the caller.

Tile convention: a tile of similarities is ``s[BLOCK_ROWS, BLOCK_CLASSES, K_PAD]`` in fp32, with
``s[r, c, k] = x_hat[row r] . w_hat[class c * K + k]`` and ``K_PAD = next_power_of_2(K)``. Lanes
``k >= K`` are padding: the caller passes ``k_valid`` (``tl.arange(0, K_PAD)[None, None, :] < K``)
and may load anything there (0 is usual). A kernel that produces the tile flat, as
``[BLOCK_ROWS, BLOCK_CLASSES * K_PAD]`` (a ``tl.dot`` output over padded proxy rows), reshapes it
with ``tl.reshape(tile, (BLOCK_ROWS, BLOCK_CLASSES, K_PAD))`` first.

The helpers, in the order a kernel uses them:

* :func:`class_similarity` -- eq. 1 and its alternatives: the reduction over the K proxies of a
  class, ``S[r, c]``, plus the weights ``q`` the backward pass needs.
* :func:`class_similarity_vjp` -- ``ds = dS/ds * dL/dS`` for a tile, from ``q`` and ``S``.
* :func:`loss_logits` -- the per-loss logit ``z = alpha * (sign * S + offset)`` where sign and
  offset depend on whether ``(r, c)`` is a positive pair, and ``dz/dS / alpha`` (the sign).
* :func:`online_lse_update` / :func:`lse_finalize` -- a running log-sum-exp (running max, running
  sum) along one axis of a 2-D tile of logits; the implicit zero logit of ``log(1 + sum e^z)`` is
  the starting state ``(m, l) = (0, 1)``.
* :func:`softplus` -- ``log(1 + e^z)``, the log-sum-exp with a zero logit of a single logit.
* :func:`terms_vjp` -- ``dL/dz`` of a tile from the terms of the backends' contract and their
  gradient (both backward passes).

Switches are integer codes, the same numbers on the host: :data:`LOSS_CODES` (pass as
``tl.constexpr``) and :data:`SIMILARITY_CODES`. The similarity mode ``SIM`` may be a
``tl.constexpr`` or a runtime ``i32``: a branch on a uniform scalar costs nothing next to the tile's
loads, and the similarity kernels take it at runtime so that the variants compiled for CI
(3 dtypes x 2 architectures x losses x K_PAD) stay within the compile budget.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mpa_kernels.kernels import triton_interpreting


def _interpreter_scalar_index() -> None:
    """Let the interpreter of older Tritons take runtime loop bounds under NumPy >= 2.4.

    The interpreter holds a scalar (a runtime argument, ``tl.program_id``, anything computed from
    them) as a NumPy array of shape (1,), and ``range(lo, hi)`` over such scalars calls the
    tensor's ``__index__``. Up to Triton 3.6 that is ``int(array)``, which NumPy 2.4 refuses for
    arrays with a dimension ("only 0-dimensional arrays can be converted to Python scalars"), so
    every kernel with a loop failed; later Tritons index ``array.squeeze()``. The interpreter
    installs its tensor methods at each launch, through ``_patch_lang_tensor``; this wraps that
    function to install the squeezing ``__index__`` after the others (the same method newer
    Tritons install, so there it changes nothing). Compiled kernels never see it.
    """
    from triton.runtime import interpreter

    install = getattr(interpreter, "_patch_lang_tensor", None)
    if install is None or getattr(install, "squeezes_index", False):
        return

    def install_then_fix_index(tensor, scope, *args, **kwargs):
        install(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    install_then_fix_index.squeezes_index = True
    interpreter._patch_lang_tensor = install_then_fix_index


if triton_interpreting():
    _interpreter_scalar_index()

# Loss kinds, as kernels see them. ProxyAnchor is MPA with K = 1; ProxyNCA arrives in SoftTriple's
# form (cross-entropy over alpha * S, delta = 0, K = 1), see mpa_kernels/_spec.py.
LOSS_MPA = tl.constexpr(0)  # column-wise: one LSE per class over its positives, one over negatives
LOSS_MPA_DW = tl.constexpr(1)  # row-wise: softplus of the positive + LSE0 over the negatives
LOSS_MPA_AP = tl.constexpr(2)  # row-wise: LSE0 over every class, the positive's similarity flipped
LOSS_SOFT_TRIPLE = tl.constexpr(3)  # row-wise: cross-entropy, no zero logit

LOSS_CODES = {
    "mpa": LOSS_MPA.value,
    "proxy_anchor": LOSS_MPA.value,
    "mpa_dw": LOSS_MPA_DW.value,
    "mpa_ap": LOSS_MPA_AP.value,
    "soft_triple": LOSS_SOFT_TRIPLE.value,
    "proxy_nca": LOSS_SOFT_TRIPLE.value,
}

SIM_SOFTMAX = tl.constexpr(0)
SIM_MAX = tl.constexpr(1)
SIM_MEAN = tl.constexpr(2)

SIMILARITY_CODES = {"softmax": SIM_SOFTMAX.value, "max": SIM_MAX.value, "mean": SIM_MEAN.value}


@triton.jit
def class_similarity(s, k_valid, inv_gamma, K, SIM):
    """Class similarity ``S[r, c]`` of a ``[R, C, K_PAD]`` fp32 tile, eq. 1 and its alternatives.

    Returns ``(S, q)``: ``S`` is ``[R, C]`` and ``q`` the ``[R, C, K_PAD]`` weights with
    ``S = sum_k q * s`` (0 on padding lanes), kept for :func:`class_similarity_vjp`.

    * ``SIM_SOFTMAX``: ``q = softmax_k(s / gamma)`` (``inv_gamma = 1 / gamma``), eq. 1.
    * ``SIM_MAX``: ``q`` is one-hot at the first maximal proxy (torch's ``max`` sends its
      gradient to one index; ties have measure zero in practice).
    * ``SIM_MEAN``: ``q = 1 / K``.

    ``K`` is the number of real proxies (a runtime int or constexpr); ``k_valid`` the padding mask,
    broadcastable to the tile. With K = 1 every mode gives ``S = s``.
    """
    if SIM == SIM_SOFTMAX:
        t = tl.where(k_valid, s * inv_gamma, float("-inf"))
        t_max = tl.max(t, axis=2)
        e = tl.exp(t - tl.expand_dims(t_max, 2))
        q = e / tl.expand_dims(tl.sum(e, axis=2), 2)
    elif SIM == SIM_MAX:
        masked = tl.where(k_valid, s, float("-inf"))
        s_max = tl.max(masked, axis=2)
        k_idx = tl.arange(0, s.shape[2])[None, None, :]
        first = tl.min(tl.where(masked == tl.expand_dims(s_max, 2), k_idx, s.shape[2]), axis=2)
        q = tl.where(k_idx == tl.expand_dims(first, 2), 1.0, 0.0)
    else:
        # Full tile shape (k_valid alone broadcasts to [1, 1, K_PAD]): every branch of a runtime
        # SIM must yield the same type.
        q = tl.where(k_valid, 1.0 / K, 0.0) + tl.zeros_like(s)
    S = tl.sum(q * s, axis=2)
    return S, q


@triton.jit
def class_similarity_vjp(s, q, S, dS, inv_gamma, SIM):
    """``ds[r, c, k] = dS[r, c] * dS_rc/ds_rck`` for the tile ``s`` and ``(S, q)`` from
    :func:`class_similarity`; 0 on padding lanes (``q`` is 0 there).

    Softmax (eq. 1): ``S = sum_k p_k s_k`` with ``p = softmax(s / gamma)``, and
    ``dp_j/ds_k = p_j (1[j = k] - p_k) / gamma``, so
    ``dS/ds_k = p_k + sum_j s_j p_j (1[j = k] - p_k) / gamma = p_k (1 + (s_k - S) / gamma)``.
    Max and mean: ``dS/ds_k = q_k`` (one-hot, or ``1 / K``).
    """
    if SIM == SIM_SOFTMAX:
        jac = q * (1.0 + (s - tl.expand_dims(S, 2)) * inv_gamma)
    else:
        jac = q
    return jac * tl.expand_dims(dS, 2)


@triton.jit
def loss_logits(S, is_pos, alpha, delta, LOSS: tl.constexpr):
    """The logit ``z = alpha * (sign * S + offset)`` of each ``(row, class)`` pair of a 2-D tile.

    Returns ``(z, sign)`` with ``dz/dS = alpha * sign``; ``is_pos`` is ``label[row] == class``.

    * MPA, MPA-DW, MPA-AP (eq. 6, 12, 15): positives ``-alpha (S - delta)``, negatives
      ``alpha (S + delta)``: sign -1 / +1, offset ``delta`` for both.
    * SoftTriple (eq. 2; ProxyNCA with delta = 0): positives ``alpha (S - delta)``, negatives
      ``alpha S``: sign +1, offset ``-delta`` / 0.

    Which logits enter which log-sum-exp (and whether with a zero logit) is the kernel's business.
    """
    if LOSS == LOSS_SOFT_TRIPLE:
        sign = tl.full(S.shape, 1.0, tl.float32)
        z = alpha * (S - tl.where(is_pos, delta, 0.0))
    else:
        sign = tl.where(is_pos, -1.0, 1.0)
        z = alpha * (sign * S + delta)
    return z, sign


@triton.jit
def online_lse_update(m, l, z, include, AXIS: tl.constexpr):
    """One step of a running log-sum-exp along ``AXIS`` (0 or 1) of the 2-D logits ``z``.

    ``(m, l)`` is the running state, 1-D over the other axis: the log-sum-exp so far is
    ``m + log(l)``. Only entries with ``include`` count. Start from ``m = 0, l = 1`` to get
    ``log(1 + sum e^z)`` (the implicit zero logit), or from ``m = -inf, l = 0`` for a plain
    log-sum-exp (an empty one finalises to ``-inf``). ``m`` never decreases and every exponent is
    ``<= 0``, so nothing overflows whatever alpha is.

    Returns the new ``(m, l)``.
    """
    zm = tl.where(include, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(zm, axis=AXIS))
    # While nothing has been included m_new is -inf; shift by 0 then so that exp(-inf) = 0, not NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l * tl.exp(m - shift) + tl.sum(tl.exp(zm - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return m_new, l_new


@triton.jit
def lse_finalize(m, l):
    """``m + log(l)``: the log-sum-exp of an :func:`online_lse_update` state (``-inf`` if empty)."""
    # A non-empty state has l >= 1 (its largest logit adds e^0); an empty one has l = 0 and
    # m = -inf, so the clamp changes nothing but keeps log(0) out of the computation.
    return m + tl.log(tl.maximum(l, 1.0))


@triton.jit
def softplus(z):
    """``log(1 + e^z)`` without overflow: ``max(z, 0) + log(1 + e^-|z|)``."""
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


# Gradient of the terms of the backends' contract (mpa_kernels.backends) with respect to the
# logits. Each term is a log-sum-exp G over a group of logits z, and dG/dz_j = e^(z_j - G) for a
# member j, whether or not G has the zero logit. With the upstream gradient g = dL/dterms
# ([2, N] or [2, C]):
#   row-wise     member of row i's LSE (no zero logit):   dz_ic = g_lse_i e^(z_ic - lse_i)
#                MPA-DW's positive, a group of its own,
#                extra_i = softplus(z_iy) = log(1 + e^z_iy): dz_iy = g_extra_i e^(z_iy - extra_i)
#                                                              = g_extra_i sigmoid(z_iy)
#                SoftTriple's positive, extra_i = -z_iy:  -g_extra_i on top of its LSE term
#                MPA-AP: extra_i = 0, nothing
#   column-wise  positive of class c:                    dz_ic = g_P_c e^(z_ic - P_c)
#                negative of class c:                    dz_ic = g_N_c e^(z_ic - N_c)
#                (P_c and N_c with their zero logit, as the terms hold them)
# A row whose label is no class has no positive pair, so only its LSE members carry a gradient.
# Groups are picked with tl.where, never by multiplying with a mask: for a non-member z - G may be
# +inf (an empty row LSE is -inf), and 0 * inf is NaN.
@triton.jit
def terms_vjp(z, is_pos, include, rows, row_ok, cls, cls_ok, N, C, terms_ptr, grad_ptr, LOSS):
    """``dL/dz`` of a ``[rows, cls]`` tile of logits from the terms (``terms_ptr``, fp32
    ``[2, N]`` or ``[2, C]``) and their gradient (``grad_ptr``, the same shape); ``include`` marks
    the members of the row's log-sum-exp (row-wise only). The caller masks the result to the real
    ``(row, class)`` pairs. ``LOSS`` is a code of :data:`LOSS_CODES`, a ``tl.constexpr`` or a
    runtime ``i32`` (every branch gives full tiles). Each pair's group ``G`` and coefficient are
    picked first, so that a tile costs one exponential per pair."""
    if LOSS == LOSS_MPA:
        g_pos = tl.load(grad_ptr + cls, mask=cls_ok, other=0.0)[None, :]
        g_neg = tl.load(grad_ptr + C + cls, mask=cls_ok, other=0.0)[None, :]
        lse_pos = tl.load(terms_ptr + cls, mask=cls_ok, other=0.0)[None, :]
        lse_neg = tl.load(terms_ptr + C + cls, mask=cls_ok, other=0.0)[None, :]
        e = tl.exp(z - tl.where(is_pos, lse_pos, lse_neg))
        dz = tl.where(is_pos, g_pos * e, g_neg * e)
    else:
        g_lse = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)[:, None]
        g_extra = tl.load(grad_ptr + N + rows, mask=row_ok, other=0.0)[:, None]
        lse = tl.load(terms_ptr + rows, mask=row_ok, other=0.0)[:, None]
        extra = tl.load(terms_ptr + N + rows, mask=row_ok, other=0.0)[:, None]
        dw_pos = is_pos & (LOSS == LOSS_MPA_DW)
        e = tl.exp(z - tl.where(dw_pos, extra, lse))
        dz = tl.where(dw_pos, g_extra * e, tl.where(include, g_lse * e, 0.0))
        dz = tl.where(is_pos & (LOSS == LOSS_SOFT_TRIPLE), dz - g_extra, dz)
    return dz
