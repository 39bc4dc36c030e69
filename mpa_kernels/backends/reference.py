"""The ``"reference"`` backend: autograd through the plain-PyTorch oracle in :mod:`reference`.

Slow and memory-hungry (it keeps several N x C x K tensors for the backward pass), and the
yardstick every other backend is tested against.
"""

from __future__ import annotations

import torch

from mpa_kernels import reference
from mpa_kernels._spec import LossSpec

LOW_PRECISION = False

_SIMILARITY_LOSSES = {
    "mpa": reference.mpa_similarity_loss,
    "proxy_anchor": reference.mpa_similarity_loss,
    "mpa_dw": reference.mpa_dw_similarity_loss,
    "mpa_ap": reference.mpa_ap_similarity_loss,
    "soft_triple": reference.soft_triple_similarity_loss,
    "proxy_nca": reference.soft_triple_similarity_loss,
}


def unavailable_reason(device: torch.device) -> str | None:
    return None


def similarity_loss(
    x_hat: torch.Tensor, w_hat: torch.Tensor, labels: torch.Tensor, spec: LossSpec
) -> torch.Tensor:
    S = reference.class_similarity(x_hat, w_hat, spec.proxies_per_class, spec.similarity, spec.gamma)
    return _SIMILARITY_LOSSES[spec.loss](S, labels, spec.alpha, spec.delta)
