"""The ``"reference"`` backend: autograd through the plain-PyTorch oracle in
:mod:`mpa_kernels.reference`.

Slow and memory-hungry (it keeps several N x C x K tensors for the backward pass), and the
yardstick every other backend is tested against. It returns the unreduced terms (every reduction)
and has none of the compute options (deterministic for a given device and thread count).
"""

from __future__ import annotations

import torch

from mpa_kernels import reference
from mpa_kernels._spec import LossSpec

LOW_PRECISION = False
SECOND_DERIVATIVES = True  # autograd through plain torch operations, differentiable again

_TERMS = {
    "mpa": reference.mpa_similarity_terms,
    "proxy_anchor": reference.mpa_similarity_terms,
    "mpa_dw": reference.mpa_dw_similarity_terms,
    "mpa_ap": reference.mpa_ap_similarity_terms,
    "soft_triple": reference.soft_triple_similarity_terms,
    "proxy_nca": reference.soft_triple_similarity_terms,
}


def unavailable_reason(device: torch.device) -> str | None:
    return None


def similarity_terms(
    x_hat: torch.Tensor, w_hat: torch.Tensor, labels: torch.Tensor, spec: LossSpec
) -> torch.Tensor:
    # x_hat and w_hat are unit rows already: normalising them again would divide the gradient of a
    # clamped row by eps twice.
    S = reference.class_similarity(x_hat, w_hat, spec.proxies_per_class, spec.similarity,
                                   spec.gamma, normalise=False)
    terms = _TERMS[spec.loss](S, labels, spec.alpha, spec.delta)
    return torch.stack(terms) if spec.column_wise else terms
