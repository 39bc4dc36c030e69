"""Backend registry and the ``backend="auto"`` rule.

A backend is a module in this package that defines

* ``unavailable_reason(device: torch.device) -> str | None``: why it cannot run on that device
  (``None`` when it can);
* ``LOW_PRECISION``: ``True`` if it computes fp16/bf16 inputs itself (accumulating in fp32);
  otherwise the front end hands it fp32 copies;
* the loss, in one or more of these forms (``x_hat``: unit embeddings (N, d); ``w_hat``: unit
  proxies (C*K, d); ``proxies``: raw proxies; ``spec``: the :class:`~mpa_kernels._spec.LossSpec`):

  - ``similarity_terms(x_hat, w_hat, labels, spec, **options) -> Tensor``: the similarity term
    unreduced, fp32 or wider. Labels outside ``[0, C)`` are allowed here (the front end refuses
    them; a caller holding a shard of the classes passes the others so): such a row has no
    positive class, and every class is one of its negatives.

    Row-wise family (MPA-DW, MPA-AP, SoftTriple, ProxyNCA): ``(2, N)``. Row 0,
    ``lse_i = log sum_c e^{z_ic}`` over the logits that enter row ``i``'s log-sum-exp, *without*
    the implicit zero logit (``-inf`` if there are none): MPA-DW its negatives
    ``alpha (S_ic + delta)``; MPA-AP every class, the positive as ``alpha (delta - S_iy)``;
    SoftTriple and ProxyNCA every class, ``alpha (S_ic - delta [c = y_i])``. Row 1, ``extra_i``,
    the positive term outside it: ``softplus(-alpha (S_iy - delta))`` for MPA-DW,
    ``-alpha (S_iy - delta)`` for SoftTriple and ProxyNCA, 0 for MPA-AP, and 0 whenever ``y_i``
    is not among the classes. Sample ``i``'s loss is ``extra_i + softplus(lse_i)`` for the
    losses with a zero logit (MPA-DW, MPA-AP), ``extra_i + lse_i`` for the others
    (:func:`mpa_kernels.functional.row_losses`); the loss is their mean. Log-sum-exps over
    disjoint sets of classes merge by ``logsumexp`` and the ``extra`` by a sum, so proxies
    sharded over devices merge their terms before ``row_losses``.

    Column-wise family (MPA, ProxyAnchor): ``(2, C)``, row 0 the positive terms
    ``P_c = log(1 + sum_{i: y_i = c} e^{-alpha (S_ic - delta)})`` (exactly 0 for a class with no
    sample in the batch), row 1 the negative terms
    ``N_c = log(1 + sum_{i: y_i != c} e^{alpha (S_ic + delta)})``; the loss is
    ``sum_c P_c / |C+| + sum_c N_c / C``, ``C+`` the classes present in the batch. Each is a
    class's own, so sharded proxies give a shard of them (with global counts).

    The front end reduces them (:func:`mpa_kernels.functional.reduce_terms`), adds the
    regulariser and serves every ``reduction``.
  - ``proxy_terms(x_hat, proxies, labels, spec, **options) -> (terms, regularizer)``: the same
    terms from *raw* proxies, with the unscaled regulariser of eq. 3 (a 0-dim tensor), for a
    backend that fuses the proxies' normalisation and the regulariser into its own sweep.
  - ``similarity_loss(x_hat, w_hat, labels, spec, **options) -> Tensor`` and optionally
    ``proxy_loss(x_hat, proxies, labels, spec, tau, **options)``: the scalar loss (the mean)
    only. A backend with only these serves ``reduction="mean"``; asked for another reduction by
    name it raises :class:`BackendUnavailableError`, and ``"auto"`` skips it.

  For ``reduction="mean"`` the front end prefers the scalar forms (a backend may fuse more when it
  knows the reduction, e.g. form the gradient during the forward), for the others it needs the
  terms; among either, the raw-proxy form when present (no C*K*d copy of the proxies is made).
* optionally ``OPTIONS``: the names of the :class:`~mpa_kernels._spec.ComputeOptions` that its
  entry points take as keyword arguments; the others are not passed (the backend has no such
  knob);
* optionally ``SECOND_DERIVATIVES = True`` if its gradient is itself differentiable (double
  backward, ``create_graph=True``); without it the front end refuses ``create_graph=True`` with a
  clear error rather than return a second derivative that treats the gradient as a constant;
* optionally ``unsupported_reason(spec) -> str | None``: why it cannot compute this loss (a kernel
  limit such as the number of proxies per class); ``"auto"`` then moves on to the next backend.

Modules are imported lazily, so a backend whose dependencies are missing (Triton on macOS, say)
costs nothing until it is asked for, and then fails with a message that says why.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

from mpa_kernels._spec import LossSpec
from mpa_kernels.kernels import triton_interpreting  # noqa: F401  (part of this module's API)

BACKENDS = ("reference", "torch", "triton", "triton-linear", "auto")

_MODULES = {
    "reference": "mpa_kernels.backends.reference",
    "torch": "mpa_kernels.backends.torch_chunked",
    "triton": "mpa_kernels.backends.triton_s",
    "triton-linear": "mpa_kernels.backends.triton_linear",
}


class BackendUnavailableError(RuntimeError):
    """The requested backend exists but cannot run here (no GPU, Triton missing, ...)."""


def check_backend_name(name: str) -> None:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _load(name: str) -> ModuleType | None:
    """The backend's module, or ``None`` if this version of the library does not ship it."""
    # A loaded module comes from sys.modules without the import machinery, which torch.compile
    # cannot trace: this keeps fullgraph compilation of a model that calls the loss possible.
    module = sys.modules.get(_MODULES[name])
    if module is not None:
        return module
    try:
        return importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as err:
        if err.name == _MODULES[name]:
            return None
        raise


def computes_terms(module: ModuleType) -> bool:
    """Whether the backend returns unreduced terms (and so serves every reduction)."""
    return hasattr(module, "similarity_terms") or hasattr(module, "proxy_terms")


def _refusal(module: ModuleType, device: torch.device, spec: LossSpec | None,
             reduction: str = "mean") -> str | None:
    reason = module.unavailable_reason(device)
    if reason is None and spec is not None and hasattr(module, "unsupported_reason"):
        reason = module.unsupported_reason(spec)
    if reason is None and reduction != "mean" and not computes_terms(module):
        reason = (f"it computes only reduction='mean' (it has no similarity_terms or proxy_terms "
                  f"entry point), not reduction={reduction!r}; use backend='reference' or 'auto'")
    return reason


# The similarity tensor s = x_hat @ w_hat.T and its gradient ds take 2 * N * C * K * b bytes in the
# "triton" backend. From this size on, "auto" prefers "triton-linear", which never stores them.
# A memory rule, and the roofline model (benchmarks/roofline.py) says a size threshold is the right
# shape for it: per score, "triton" moves s and ds through HBM six times and "triton-linear" pays a
# fourth GEMM over K padded to a power of two, so which is faster depends on the dtype, K and N
# (the fused backward's fp32 gradient buffers are a fixed cost), not on the size of s. On H100 and
# H200 "triton" is predicted faster at every benchmark shape; where this rule fires, the fused
# kernels take 0.76-1.34x its time in bf16 and 1.24-2.0x in fp32 (CUDA cores, no TF32), for at
# least 1 GiB less memory. See the README's "Performance".
LINEAR_MIN_SIMILARITY_BYTES = 1 << 30


def auto_backend(
    device: torch.device,
    spec: LossSpec | None = None,
    batch_size: int | None = None,
    element_size: int = 4,
    reduction: str = "mean",
) -> str:
    """The rule behind ``backend="auto"``: the fastest backend that can run on ``device``.

    CUDA tensors go to the Triton kernels: ``"triton-linear"`` when ``s`` and ``ds`` would take at
    least :data:`LINEAR_MIN_SIMILARITY_BYTES` (``2 * batch_size * C * K * element_size``), else
    ``"triton"``. CPU tensors go to the chunked PyTorch backend. The Triton interpreter
    (``TRITON_INTERPRET=1``) is for testing and is only used when ``"triton"`` or
    ``"triton-linear"`` is asked for by name. A backend this version does not ship, or one that
    cannot compute ``spec`` (say, more proxies per class than its kernels hold) or ``reduction``, is
    skipped, down to the reference, which runs everywhere.
    """
    if device.type == "cuda":
        preference = ("triton", "torch", "reference")
        if spec is not None and batch_size is not None:
            s_bytes = spec.num_classes * spec.proxies_per_class * batch_size * element_size
            if 2 * s_bytes >= LINEAR_MIN_SIMILARITY_BYTES:
                preference = ("triton-linear",) + preference
    else:
        preference = ("torch", "reference")
    for name in preference:
        module = _load(name)
        if module is not None and _refusal(module, device, spec, reduction) is None:
            return name
    return "reference"


def resolve(
    name: str,
    device: torch.device,
    spec: LossSpec | None = None,
    batch_size: int | None = None,
    element_size: int = 4,
    reduction: str = "mean",
) -> ModuleType:
    """The module implementing backend ``name`` on ``device``; a clear error if there is none."""
    check_backend_name(name)
    if name == "auto":
        name = auto_backend(device, spec, batch_size, element_size, reduction)
    module = _load(name)
    if module is None:
        available = [n for n in _MODULES if _load(n) is not None]
        raise BackendUnavailableError(
            f"backend {name!r} is not implemented in this version of mpa-kernels; "
            f"available backends: {available}"
        )
    reason = _refusal(module, device, spec, reduction)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return module
