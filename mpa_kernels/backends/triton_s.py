"""The ``"triton"`` backend: torch computes ``s = x_hat @ w_hat.T``, Triton kernels do the rest.

The loss kernels (:mod:`mpa_kernels.kernels.similarity`) read ``s`` once forward and once backward
and write ``ds`` once; they return the unreduced terms of the contract in
:mod:`mpa_kernels.backends` (so every reduction; the front end reduces them). Autograd takes ``ds`` through the GEMM
(``dx = ds @ w``, ``dw = ds^T @ x``) and the normalisation. fp16 and bf16 inputs keep their dtype
for the GEMMs and for ``s``/``ds``; the kernels accumulate in fp32 and return fp32 terms. fp64
inputs are computed in fp32 (the kernels have no fp64 path; fp64 is for checking, not speed) and
the terms come back in fp64.

Runs on CUDA, and on CPU through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before
Triton was imported (slow; meant for tests).
"""

from __future__ import annotations

import importlib.util

import torch

from mpa_kernels._spec import LossSpec
from mpa_kernels.backends import triton_interpreting

LOW_PRECISION = True


def unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    if device.type == "cpu":
        return ("Triton kernels need a CUDA GPU; on CPU they run only through the interpreter, "
                "with TRITON_INTERPRET=1 set before the first import of triton (slow, for "
                "testing). Use backend='torch' on CPU.")
    return f"Triton kernels run on CUDA devices, not {device.type}"


def proxies_limit_reason(spec: LossSpec, limit: int) -> str | None:
    """Why kernels that hold at most ``limit`` proxies of a class in one tile refuse ``spec``."""
    if spec.proxies_per_class > limit:
        return (f"its kernels hold up to {limit} proxies per class, got "
                f"{spec.proxies_per_class}; use backend='torch'")
    return None


def unsupported_reason(spec: LossSpec) -> str | None:
    from mpa_kernels.kernels.similarity import MAX_PROXIES_PER_CLASS

    return proxies_limit_reason(spec, MAX_PROXIES_PER_CLASS)


def similarity_terms(
    x_hat: torch.Tensor, w_hat: torch.Tensor, labels: torch.Tensor, spec: LossSpec
) -> torch.Tensor:
    from mpa_kernels.kernels.similarity import similarity_terms as terms_over_s

    compute_dtype = torch.float32 if x_hat.dtype == torch.float64 else x_hat.dtype
    s = (x_hat.to(compute_dtype) @ w_hat.to(compute_dtype).T).contiguous()
    terms = terms_over_s(s, labels, spec.loss, spec.num_classes, spec.proxies_per_class,
                         spec.similarity, spec.alpha, spec.delta, spec.gamma)
    return terms.to(torch.promote_types(terms.dtype, x_hat.dtype))
