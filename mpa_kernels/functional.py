"""The losses as functions that take the proxies as an argument.

Every function normalises ``embeddings`` (N, d) and ``proxies`` (C * K, d; row ``c * K + k`` is proxy
``k`` of class ``c``), hands them to the chosen backend for the similarity term, and adds
``tau`` times the proxy regulariser (eq. 3). Under autocast the loss is computed in fp32 (fp64 inputs
stay fp64); gradients come back in the dtype of each input.
"""

from __future__ import annotations

import torch

from mpa_kernels._checks import NORM_EPS, check_inputs, check_proxies
from mpa_kernels._spec import LossSpec, check_int, check_loss_hyperparameters, check_number
from mpa_kernels.backends import _MODULES, check_backend_name, resolve

__all__ = [
    "mpa_loss",
    "mpa_dw_loss",
    "mpa_ap_loss",
    "soft_triple_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "proxy_regularizer",
]

_REGULARIZER_EPS = 1e-12
_NORM_EPS = NORM_EPS  # F.normalize's; the input checks refuse rows that short
_HALF = (torch.float16, torch.bfloat16)


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
    return _FirstDerivativesOnly.apply(value, _BACKEND_NAMES.get(impl.__name__, impl.__name__))


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


def _proxy_loss(
    loss: str,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxies_per_class: int,
    alpha: float,
    delta: float,
    gamma: float,
    tau: float,
    similarity: str,
    backend: str,
    validate: bool,
) -> torch.Tensor:
    check_backend_name(backend)
    check_int("proxies_per_class", proxies_per_class)
    num_classes = check_inputs(embeddings, labels, proxies, proxies_per_class, validate)
    check_loss_hyperparameters(
        loss, num_classes, proxies_per_class, alpha, delta, gamma, tau, similarity
    )
    spec = LossSpec(loss, num_classes, proxies_per_class, float(alpha), float(delta),
                    float(gamma), similarity)
    dtype = torch.promote_types(embeddings.dtype, proxies.dtype)
    impl = resolve(backend, embeddings.device, spec, embeddings.shape[0], dtype.itemsize)
    if dtype in _HALF and not impl.LOW_PRECISION:
        dtype = torch.float32
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x_hat = unit_rows(embeddings.to(dtype))
        if hasattr(impl, "proxy_loss"):
            # The backend normalises the proxies and adds the regulariser inside its own sweep,
            # so that no C*K*d copy of them (nor of their gradient) is ever made.
            return first_order_guard(
                impl, impl.proxy_loss(x_hat, proxies.to(dtype), labels.long(), spec, float(tau))
            )
        w_hat = unit_rows(proxies.to(dtype))
        value = first_order_guard(impl, impl.similarity_loss(x_hat, w_hat, labels.long(), spec))
        if tau and proxies_per_class > 1:
            reg_dtype = torch.float32 if dtype in _HALF else dtype
            value = value + tau * unit_proxy_regularizer(w_hat.to(reg_dtype), proxies_per_class)
    return value


def mpa_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    proxies_per_class: int,
    alpha: float = 32.0,
    delta: float = 0.1,
    gamma: float = 0.1,
    tau: float = 0.2,
    similarity: str = "softmax",
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """MPA loss (eq. 6-7), class-wise: one log-sum-exp per class over the batch."""
    return _proxy_loss("mpa", embeddings, labels, proxies, proxies_per_class, alpha, delta,
                       gamma, tau, similarity, backend, validate)


def mpa_dw_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    proxies_per_class: int,
    alpha: float = 32.0,
    delta: float = 0.1,
    gamma: float = 0.1,
    tau: float = 0.2,
    similarity: str = "softmax",
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """MPA-DW loss (eq. 12-13), data-wise: a softplus for the positive class and one log-sum-exp
    per sample over the negative classes."""
    return _proxy_loss("mpa_dw", embeddings, labels, proxies, proxies_per_class, alpha, delta,
                       gamma, tau, similarity, backend, validate)


def mpa_ap_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    proxies_per_class: int,
    alpha: float = 32.0,
    delta: float = 0.1,
    gamma: float = 0.1,
    tau: float = 0.2,
    similarity: str = "softmax",
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """MPA-AP loss (eq. 15-17), data-wise over all pairs: one log-sum-exp per sample over every
    class, the positive one with its similarity flipped (``delta - S``)."""
    return _proxy_loss("mpa_ap", embeddings, labels, proxies, proxies_per_class, alpha, delta,
                       gamma, tau, similarity, backend, validate)


def soft_triple_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    proxies_per_class: int,
    alpha: float = 20.0,
    delta: float = 0.01,
    gamma: float = 0.1,
    tau: float = 0.2,
    similarity: str = "softmax",
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """SoftTriple loss (eq. 2-4), batch mean. ``alpha`` is SoftTriple's ``lambda``; defaults are
    SoftTriple's paper's."""
    return _proxy_loss("soft_triple", embeddings, labels, proxies, proxies_per_class, alpha,
                       delta, gamma, tau, similarity, backend, validate)


def proxy_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    alpha: float = 32.0,
    delta: float = 0.1,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """ProxyAnchor loss: one proxy per class (``proxies`` is ``(C, d)``); MPA with K = 1, tau = 0."""
    return _proxy_loss("proxy_anchor", embeddings, labels, proxies, 1, alpha, delta, 0.1, 0.0,
                       "softmax", backend, validate)


def proxy_nca_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    scale: float = 9.0,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """ProxyNCA loss (ProxyNCA++ / pytorch-metric-learning form): softmax cross-entropy over
    ``-scale * ||x_hat - w_hat_c||^2``, one proxy per class (``proxies`` is ``(C, d)``)."""
    check_number("scale", scale, positive=True)
    # -scale * ||x - w||^2 = 2 * scale * s - 2 * scale for unit vectors; the constant cancels.
    return _proxy_loss("proxy_nca", embeddings, labels, proxies, 1, 2.0 * scale, 0.0, 0.1, 0.0,
                       "softmax", backend, validate)
