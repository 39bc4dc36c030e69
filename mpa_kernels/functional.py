"""The losses as functions that take the proxies as an argument.

Every function normalises ``embeddings`` (N, d) and ``proxies`` (C * K, d; row ``c * K + k`` is proxy
``k`` of class ``c``), hands them to the chosen backend for the similarity term, and adds
``tau`` times the proxy regulariser (eq. 3). Under autocast the loss is computed in fp32 (fp64 inputs
stay fp64); gradients come back in the dtype of each input.

:func:`proxy_loss` computes the loss a :class:`~mpa_kernels._spec.LossSpec` describes; the six
named functions build the spec from their keyword arguments and call it. Every one takes the same
call options, keyword-only:

* ``reduction``: ``"mean"`` (the loss as the paper defines it), ``"none"`` or ``"sum"`` (see
  :func:`reduce_terms`);
* ``backend``: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"triton-linear"``;
* ``validate``: the value checks (label range, finiteness); host-side with a ``ValueError`` in eager
  CPU code, device-side assertions without a host sync on CUDA and under ``torch.compile``;
* ``deterministic``, ``filter_eps``, ``allow_tf32``: :class:`~mpa_kernels._spec.ComputeOptions`
  (``None``: the backend's module-level default; backends without the knob ignore them).
"""

from __future__ import annotations

import torch

from mpa_kernels._checks import (
    NORM_EPS,
    assert_values_async,
    check_inputs,
    check_proxies,
    value_checks_on_host,
)
from mpa_kernels._spec import ComputeOptions, LossSpec, check_int, check_number, check_reduction
from mpa_kernels._terms import REGULARIZER_EPS as _REGULARIZER_EPS
from mpa_kernels._terms import reduce_terms, row_losses
from mpa_kernels.backends import _MODULES, check_backend_name, resolve

__all__ = [
    "proxy_loss",
    "reduce_terms",
    "row_losses",
    "mpa_loss",
    "mpa_dw_loss",
    "mpa_ap_loss",
    "soft_triple_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "proxy_regularizer",
]

_NORM_EPS = NORM_EPS  # F.normalize's; the input checks refuse rows that short
_HALF = (torch.float16, torch.bfloat16)

# A backend's entry points in the order the front end prefers them: for the mean, the scalar ones
# (a backend may fuse more when it knows the reduction), then the terms; for "none" and "sum", the
# terms only (resolve() has refused a backend without them). Raw-proxy forms first.
_ENTRY_POINTS = {
    True: ("proxy_loss", "similarity_loss", "proxy_terms", "similarity_terms"),
    False: ("proxy_terms", "similarity_terms"),
}


class _UnitRows(torch.autograd.Function):
    """``v / max(||v||, eps)`` row by row, with its analytic backward.

    ``F.normalize`` keeps the graph of a norm, a clamp, an expand and a division, whose backward
    materialises several tensors of the proxies' size (C*K*d: 221 MiB at SOP scale with K = 10).
    Here the backward is one fused expression, ``(g - u (u . g)) / ||v||`` (the projection of ``g``
    off ``u``, scaled), and ``g / eps`` for rows whose norm was clamped.

    Under ``create_graph=True`` (a Hessian-vector product, a gradient penalty) the same expression
    is evaluated in differentiable operations with ``1 / ||v||`` recomputed from ``v``, so that the
    second derivative sees the norm depend on ``v``; treating it as a constant is off by tens of
    percent. For that ``v`` is kept too, which costs nothing when the caller holds it anyway (the
    proxies, the embeddings).
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        unclamped = norm > _NORM_EPS
        inv = norm.clamp_min_(_NORM_EPS).reciprocal_()
        u = v * inv
        ctx.save_for_backward(v, u, inv, unclamped)
        return u

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        v, u, inv, unclamped = ctx.saved_tensors
        if torch.is_grad_enabled():
            inv = torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(_NORM_EPS).reciprocal()
            u = v * inv
            dot = torch.linalg.vecdot(u, g, dim=1).unsqueeze(1) * unclamped
            return (g - u * dot) * inv
        dot = torch.linalg.vecdot(u, g, dim=1).unsqueeze(1).mul_(unclamped)
        return torch.addcmul(g, u, dot, value=-1.0).mul_(inv)


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` scaled to unit L2 norm (as ``F.normalize(v, dim=1)``, leaner backward, and
    twice differentiable)."""
    return _UnitRows.apply(v)


class _FirstDerivativesOnly(torch.autograd.Function):
    """The identity on the loss of a backend whose backward is not itself differentiable (a Triton
    kernel, a hand-written backward): asked for a graph of its gradient (``create_graph=True``),
    it refuses at once, instead of letting that graph treat the backend's gradient as a constant
    (a second derivative that is silently wrong) or fail later naming an internal operator."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, backend: str) -> torch.Tensor:
        ctx.backend = backend
        return value.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"backend {ctx.backend!r} gives first derivatives only, and this backward was "
                "asked to build a graph for second ones (create_graph=True: a Hessian-vector "
                "product, a gradient penalty); use backend='reference' for second derivatives"
            )
        return g, None


_BACKEND_NAMES = {module: name for name, module in _MODULES.items()}


def first_order_guard(impl, value: torch.Tensor) -> torch.Tensor:
    """``value`` from backend module ``impl``, guarded unless the backend declares
    ``SECOND_DERIVATIVES = True`` (its gradient is itself differentiable)."""
    if getattr(impl, "SECOND_DERIVATIVES", False):
        return value
    name = getattr(impl, "__name__", type(impl).__name__)
    return _FirstDerivativesOnly.apply(value, _BACKEND_NAMES.get(name, name))


def unit_proxy_regularizer(w_hat: torch.Tensor, proxies_per_class: int) -> torch.Tensor:
    """Eq. 3 on proxies that are already unit rows; see :func:`proxy_regularizer`."""
    k = proxies_per_class
    if k == 1:
        return w_hat.new_zeros(())
    w = w_hat.view(-1, k, w_hat.shape[1])
    sims = torch.bmm(w, w.transpose(1, 2))
    # Index pairs, not a boolean mask: a mask's data-dependent shape splits torch.compile's graph.
    t, s = torch.triu_indices(k, k, offset=1, device=w_hat.device)
    dist = torch.sqrt(2.0 - 2.0 * sims[:, t, s].clamp(max=1.0) + _REGULARIZER_EPS)
    return dist.sum() / (w.shape[0] * k * (k - 1))


def proxy_regularizer(
    proxies: torch.Tensor, proxies_per_class: int, *, validate: bool = True
) -> torch.Tensor:
    """Eq. 3: mean over same-class proxy pairs ``t < s`` of ``sqrt(2 - 2 w_cs . w_ct)``.

    Normalised by ``C * K * (K - 1)`` as in the paper (twice the number of pairs), with a tiny
    constant under the root so that identical proxies have a finite gradient. Zero for ``K = 1``.
    ``proxies`` is checked as the losses check it; ``validate=False`` skips the value checks
    (finite rows, none of them zero).
    """
    check_int("proxies_per_class", proxies_per_class)
    check_proxies(proxies, proxies_per_class, validate)
    return unit_proxy_regularizer(unit_rows(proxies), proxies_per_class)


def proxy_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    spec: LossSpec,
    *,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
    deterministic: bool | None = None,
    filter_eps: float | None = None,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """The loss ``spec`` describes, of ``embeddings`` (N, d) with integer ``labels`` (N,) against
    ``proxies`` (``spec.num_classes * spec.proxies_per_class``, d). The call options are those of
    the module docstring; ``reduction`` is explained in :func:`reduce_terms`."""
    if not isinstance(spec, LossSpec):
        raise TypeError(f"spec must be a LossSpec, got {type(spec).__name__}")
    check_reduction(reduction, spec)
    check_backend_name(backend)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be True or False, got {validate!r}")
    options = ComputeOptions(deterministic, filter_eps, allow_tf32)
    k = spec.proxies_per_class
    on_host = validate and isinstance(embeddings, torch.Tensor) and value_checks_on_host(embeddings)
    num_classes = check_inputs(embeddings, labels, proxies, k, on_host)
    if num_classes != spec.num_classes:
        raise ValueError(f"proxies hold {num_classes} classes of {k} proxies; the loss is for "
                         f"{spec.num_classes} classes")
    on_device = validate and not on_host
    if on_device:
        assert_values_async(labels, num_classes, embeddings=embeddings, proxies=proxies)
    dtype = torch.promote_types(embeddings.dtype, proxies.dtype)
    impl = resolve(backend, embeddings.device, spec, embeddings.shape[0], dtype.itemsize, reduction)
    if dtype in _HALF and not impl.LOW_PRECISION:
        dtype = torch.float32
    reg_dtype = torch.float32 if dtype in _HALF else dtype
    kwargs = options.for_backend(impl)
    labels = labels.long()
    regularize = spec.tau != 0.0 and k > 1
    entry = next(name for name in _ENTRY_POINTS[reduction == "mean"] if hasattr(impl, name))
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x_hat = unit_rows(embeddings.to(dtype))
        if entry.startswith("proxy_"):
            # The backend normalises the proxies and adds the regulariser inside its own sweep,
            # so that no C*K*d copy of them (nor of their gradient) is ever made.
            w = proxies.to(dtype)
            if entry == "proxy_loss":
                value = first_order_guard(
                    impl, impl.proxy_loss(x_hat, w, labels, spec, spec.tau, **kwargs))
            else:
                terms, reg = impl.proxy_terms(x_hat, w, labels, spec, **kwargs)
                terms, reg = first_order_guard(impl, terms), first_order_guard(impl, reg)
                value = reduce_terms(terms, labels, spec, reduction, reg if regularize else None)
        else:
            w_hat = unit_rows(proxies.to(dtype))
            out = getattr(impl, entry)(x_hat, w_hat, labels, spec, **kwargs)
            out = first_order_guard(impl, out)
            reg = unit_proxy_regularizer(w_hat.to(reg_dtype), k) if regularize else None
            if entry == "similarity_loss":
                value = out if reg is None else out + spec.tau * reg
            else:
                value = reduce_terms(out, labels, spec, reduction, reg)
    return value


def _named_loss(loss, embeddings, labels, proxies, proxies_per_class, options, **hyper):
    """A named function's call: the spec from its keyword arguments and the proxies' shape."""
    check_int("proxies_per_class", proxies_per_class)
    num_classes = check_inputs(embeddings, labels, proxies, proxies_per_class, False)
    spec = LossSpec(loss, num_classes, proxies_per_class, **hyper)
    return proxy_loss(embeddings, labels, proxies, spec, **options)


def mpa_loss(embeddings, labels, proxies, *, proxies_per_class: int, alpha: float = 32.0,
             delta: float = 0.1, gamma: float = 0.1, tau: float = 0.2,
             similarity: str = "softmax", **options) -> torch.Tensor:
    """MPA loss (eq. 6-7), class-wise: one log-sum-exp per class over the batch.
    ``reduction="none"`` gives the per-class terms (their sum is the loss)."""
    return _named_loss("mpa", embeddings, labels, proxies, proxies_per_class, options,
                       alpha=alpha, delta=delta, gamma=gamma, tau=tau, similarity=similarity)


def mpa_dw_loss(embeddings, labels, proxies, *, proxies_per_class: int, alpha: float = 32.0,
                delta: float = 0.1, gamma: float = 0.1, tau: float = 0.2,
                similarity: str = "softmax", **options) -> torch.Tensor:
    """MPA-DW loss (eq. 12-13), data-wise: a softplus for the positive class and one log-sum-exp
    per sample over the negative classes. ``reduction="none"`` gives the per-sample terms."""
    return _named_loss("mpa_dw", embeddings, labels, proxies, proxies_per_class, options,
                       alpha=alpha, delta=delta, gamma=gamma, tau=tau, similarity=similarity)


def mpa_ap_loss(embeddings, labels, proxies, *, proxies_per_class: int, alpha: float = 32.0,
                delta: float = 0.1, gamma: float = 0.1, tau: float = 0.2,
                similarity: str = "softmax", **options) -> torch.Tensor:
    """MPA-AP loss (eq. 15-17), data-wise over all pairs: one log-sum-exp per sample over every
    class, the positive one with its similarity flipped (``delta - S``). ``reduction="none"``
    gives the per-sample terms."""
    return _named_loss("mpa_ap", embeddings, labels, proxies, proxies_per_class, options,
                       alpha=alpha, delta=delta, gamma=gamma, tau=tau, similarity=similarity)


def soft_triple_loss(embeddings, labels, proxies, *, proxies_per_class: int, alpha: float = 20.0,
                     delta: float = 0.01, gamma: float = 0.1, tau: float = 0.2,
                     similarity: str = "softmax", **options) -> torch.Tensor:
    """SoftTriple loss (eq. 2-4), batch mean. ``alpha`` is SoftTriple's ``lambda``; defaults are
    SoftTriple's paper's. ``reduction="none"`` gives the per-sample terms."""
    return _named_loss("soft_triple", embeddings, labels, proxies, proxies_per_class, options,
                       alpha=alpha, delta=delta, gamma=gamma, tau=tau, similarity=similarity)


def proxy_anchor_loss(embeddings, labels, proxies, *, alpha: float = 32.0, delta: float = 0.1,
                      **options) -> torch.Tensor:
    """ProxyAnchor loss: one proxy per class (``proxies`` is ``(C, d)``); MPA with K = 1, tau = 0.
    ``reduction="none"`` gives the per-class terms (their sum is the loss)."""
    return _named_loss("proxy_anchor", embeddings, labels, proxies, 1, options,
                       alpha=alpha, delta=delta)


def proxy_nca_loss(embeddings, labels, proxies, *, scale: float = 9.0,
                   **options) -> torch.Tensor:
    """ProxyNCA loss (ProxyNCA++ / pytorch-metric-learning form): softmax cross-entropy over
    ``-scale * ||x_hat - w_hat_c||^2``, one proxy per class (``proxies`` is ``(C, d)``).
    ``reduction="none"`` gives the per-sample terms."""
    return _named_loss("proxy_nca", embeddings, labels, proxies, 1, options,
                       alpha=nca_alpha(scale), delta=0.0)


def nca_alpha(scale: float) -> float:
    """ProxyNCA's ``scale`` as the logit scale of the SoftTriple form backends compute:
    ``-scale * ||x - w||^2 = 2 * scale * s - 2 * scale`` for unit vectors, and the constant
    cancels in the softmax."""
    check_number("scale", scale, positive=True)
    return 2.0 * float(scale)
