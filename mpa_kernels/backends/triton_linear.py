"""The ``"triton-linear"`` backend: the loss straight from ``x_hat`` and ``w_hat``, no N x C*K
tensor.

Fused-linear Triton kernels (:mod:`mpa_kernels.kernels.linear`) compute tiles of
``x_hat @ w_hat.T`` with ``tl.dot`` (fp32 accumulation), reduce them at once and keep O(N + C)
statistics, and return the unreduced terms of the contract in :mod:`mpa_kernels.backends` (every
reduction; the front end reduces them); the backward recomputes the tiles. fp16/bf16 inputs stay
in their dtype, fp32 uses TF32 when allowed, fp64 is computed in fp32 and the terms come back in
fp64.

Settings (module attributes, read at each call, are the defaults; the loss's per-call options
``deterministic``, ``filter_eps`` and ``allow_tf32`` reach :func:`similarity_terms` as keyword
arguments and override them):

* ``DETERMINISTIC`` (``None``: follow ``torch.are_deterministic_algorithms_enabled()``): no
  order-dependent atomics in the backward, at the price of recomputing s once more (5 instead of 4
  GEMM-equivalents per forward + backward).
* ``FILTER_EPS`` (``0.0``, off): skip the gradient products of backward tiles whose class-level
  weights are all below it (Cut Cross-Entropy-style gradient filtering; the loss stays exact, the
  gradients lose at most the documented amount, see :mod:`mpa_kernels.kernels.linear`).
* ``ALLOW_TF32`` (``None``: follow ``torch.backends.cuda.matmul.allow_tf32``): TF32 dots for fp32.

Runs on CUDA, and on CPU through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before
Triton was imported (slow; meant for tests).
"""

from __future__ import annotations

import torch

from mpa_kernels._spec import LossSpec
from mpa_kernels.backends import BackendUnavailableError, triton_interpreting
# Same requirements as the "triton" backend: Triton, and CUDA or the interpreter.
from mpa_kernels.backends.triton_s import proxies_limit_reason, unavailable_reason  # noqa: F401

LOW_PRECISION = True

# The per-call options (mpa_kernels._spec.ComputeOptions) that the front end passes on.
OPTIONS = ("deterministic", "filter_eps", "allow_tf32")

DETERMINISTIC: bool | None = None
FILTER_EPS: float = 0.0
ALLOW_TF32: bool | None = None


def unsupported_reason(spec: LossSpec) -> str | None:
    from mpa_kernels.kernels.linear import MAX_PROXIES_PER_CLASS

    return proxies_limit_reason(spec, MAX_PROXIES_PER_CLASS)


def dtype_unavailable_reason(dtype: torch.dtype) -> str | None:
    """Why the kernels cannot compute in ``dtype`` here: the Triton interpreter's bf16 ``tl.dot``
    returns garbage (a 16 x 16 product off by 1e10 with Triton 3.9), and these kernels are built on
    ``tl.dot``. On a GPU bf16 is compiled and fine."""
    if dtype == torch.bfloat16 and triton_interpreting():
        return ("bfloat16 through the Triton interpreter (TRITON_INTERPRET=1) is refused: its bf16 "
                "tl.dot gives wrong products. Use float16 or float32 there, or backend='triton', "
                "which takes bf16 under the interpreter")
    return None


def similarity_terms(
    x_hat: torch.Tensor,
    w_hat: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    *,
    deterministic: bool | None = None,
    filter_eps: float | None = None,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    from mpa_kernels.kernels.linear import fused_linear_terms

    reason = dtype_unavailable_reason(x_hat.dtype)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend 'triton-linear' cannot run on {x_hat.device}: {reason}"
        )
    terms = fused_linear_terms(
        x_hat, w_hat, labels, spec,
        deterministic=DETERMINISTIC if deterministic is None else deterministic,
        filter_eps=FILTER_EPS if filter_eps is None else filter_eps,
        allow_tf32=ALLOW_TF32 if allow_tf32 is None else allow_tf32,
    )
    return terms.to(torch.promote_types(terms.dtype, x_hat.dtype))
