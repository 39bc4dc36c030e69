"""Backend registry and the ``backend="auto"`` rule.

A backend is a module in this package that defines

* ``similarity_loss(x_hat, w_hat, labels, spec) -> Tensor``: the scalar similarity term of
  ``spec.loss`` (see :mod:`mpa_kernels._spec`), differentiable in ``x_hat`` and ``w_hat``;
* ``unavailable_reason(device: torch.device) -> str | None``: why it cannot run on that device
  (``None`` when it can);
* ``LOW_PRECISION``: ``True`` if it computes fp16/bf16 inputs itself (accumulating in fp32);
  otherwise the front end hands it fp32 copies;
* optionally ``proxy_loss(x_hat, proxies, labels, spec, tau) -> Tensor``: the whole loss from
  *raw* proxies (similarity term plus ``tau`` times the regulariser of eq. 3), for a backend that
  fuses the proxies' normalisation and the regulariser into its own sweep; the front end then
  calls it instead of ``similarity_loss``;
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
import os
import sys
from types import ModuleType

import torch

from mpa_kernels._spec import LossSpec

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


def triton_interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _refusal(module: ModuleType, device: torch.device, spec: LossSpec | None) -> str | None:
    reason = module.unavailable_reason(device)
    if reason is None and spec is not None and hasattr(module, "unsupported_reason"):
        reason = module.unsupported_reason(spec)
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
) -> str:
    """The rule behind ``backend="auto"``: the fastest backend that can run on ``device``.

    CUDA tensors go to the Triton kernels: ``"triton-linear"`` when ``s`` and ``ds`` would take at
    least :data:`LINEAR_MIN_SIMILARITY_BYTES` (``2 * batch_size * C * K * element_size``), else
    ``"triton"``. CPU tensors go to the chunked PyTorch backend. The Triton interpreter
    (``TRITON_INTERPRET=1``) is for testing and is only used when ``"triton"`` or
    ``"triton-linear"`` is asked for by name. A backend this version does not ship, or one that
    cannot compute ``spec`` (say, more proxies per class than its kernels hold), is skipped, down
    to the reference, which runs everywhere.
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
        if module is not None and _refusal(module, device, spec) is None:
            return name
    return "reference"


def resolve(
    name: str,
    device: torch.device,
    spec: LossSpec | None = None,
    batch_size: int | None = None,
    element_size: int = 4,
) -> ModuleType:
    """The module implementing backend ``name`` on ``device``; a clear error if there is none."""
    check_backend_name(name)
    if name == "auto":
        name = auto_backend(device, spec, batch_size, element_size)
    module = _load(name)
    if module is None:
        available = [n for n in _MODULES if _load(n) is not None]
        raise BackendUnavailableError(
            f"backend {name!r} is not implemented in this version of mpa-kernels; "
            f"available backends: {available}"
        )
    reason = _refusal(module, device, spec)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return module
