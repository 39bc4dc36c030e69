"""The ``"reference"`` backend: autograd through plain PyTorch on the oracle's class similarity
(:func:`mpa_kernels.reference.class_similarity`).

Slow and memory-hungry (it keeps several N x C x K tensors for the backward pass), and the
yardstick every other backend is tested against. It returns the unreduced terms of the contract
in :mod:`mpa_kernels.backends` (every reduction), written as plain torch expressions of ``S`` whose
reductions the tests check against the oracle's one-function-per-equation terms, and has none of
the compute options (deterministic for a given device and thread count).
"""

from __future__ import annotations

import torch

from mpa_kernels import reference
from mpa_kernels._spec import LossSpec

LOW_PRECISION = False
SECOND_DERIVATIVES = True  # autograd through plain torch operations, differentiable again


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _masked_logsumexp(z: torch.Tensor, members: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum_{members} e^z`` along ``dim``, ``-inf`` where there are none. masked_fill's
    backward zeroes the non-members' gradient (which an empty row's ``-inf - -inf`` makes NaN)."""
    return torch.logsumexp(z.masked_fill(~members, float("-inf")), dim=dim)


def terms_of_class_similarity(S: torch.Tensor, labels: torch.Tensor,
                              spec: LossSpec) -> torch.Tensor:
    """The contract's terms from the class similarity ``S`` (N, C). ``labels`` outside
    ``[0, C)`` have no positive class: every class is a negative of that row."""
    alpha, delta = spec.alpha, spec.delta
    classes = torch.arange(S.shape[1], device=S.device)
    pos = labels[:, None] == classes[None, :]
    has_pos = pos.any(dim=1)
    if spec.column_wise:
        # The zero logit of log(1 + sum e^z): logaddexp with 0 (an empty sum gives exactly 0).
        zero = S.new_zeros(S.shape[1])
        P = torch.logaddexp(_masked_logsumexp(-alpha * (S - delta), pos, 0), zero)
        Nc = torch.logaddexp(_masked_logsumexp(alpha * (S + delta), ~pos, 0), zero)
        return torch.stack((P, Nc))
    zeros = S.new_zeros(S.shape[0])
    s_pos = torch.where(pos, S, 0.0).sum(dim=1)
    if spec.loss == "mpa_dw":
        lse = _masked_logsumexp(alpha * (S + delta), ~pos, 1)
        extra = torch.where(has_pos, torch.nn.functional.softplus(-alpha * (s_pos - delta)), zeros)
    elif spec.loss == "mpa_ap":
        lse = torch.logsumexp(alpha * torch.where(pos, delta - S, S + delta), dim=1)
        extra = zeros
    else:  # soft_triple, proxy_nca: cross-entropy over alpha * (S - delta * onehot(y))
        lse = torch.logsumexp(alpha * (S - delta * pos.to(S.dtype)), dim=1)
        extra = torch.where(has_pos, -alpha * (s_pos - delta), zeros)
    return torch.stack((lse, extra))


def similarity_terms(
    x_hat: torch.Tensor, w_hat: torch.Tensor, labels: torch.Tensor, spec: LossSpec
) -> torch.Tensor:
    # x_hat and w_hat are unit rows already: normalising them again would divide the gradient of a
    # clamped row by eps twice.
    S = reference.class_similarity(x_hat, w_hat, spec.proxies_per_class, spec.similarity,
                                   spec.gamma, normalise=False)
    return terms_of_class_similarity(S, labels, spec)
