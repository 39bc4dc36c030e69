"""How the front end turns a backend's unreduced terms into the loss (every reduction).

Below both the front end (:mod:`mpa_kernels.functional`) and the backends, which reduce their own
terms for the mean, and the class-parallel module, which merges per-rank terms first: the terms
contract itself is documented in :mod:`mpa_kernels.backends`.
"""

from __future__ import annotations

import torch

from mpa_kernels._spec import LossSpec, check_reduction

# Under the square root of eq. 3, so that coinciding proxies have a finite gradient.
REGULARIZER_EPS = 1e-12


# The row-wise losses whose log-sum-exp has the implicit zero logit, log(1 + sum e^z).
_ZERO_LOGIT = frozenset({"mpa_dw", "mpa_ap"})


def row_losses(terms: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The per-sample similarity losses ``(N,)`` of a row-wise loss from its terms ``(2, N)``.

    Row 0 is ``lse_i``, the log-sum-exp of the logits in row ``i``'s log-sum-exp without the
    zero logit (``-inf`` if there are none), row 1 ``extra_i``, the positive term outside it. The
    loss is ``extra_i + softplus(lse_i)`` for MPA-DW and MPA-AP (``softplus`` adds the zero
    logit), ``extra_i + lse_i`` for SoftTriple and ProxyNCA. Log-sum-exps of disjoint sets of
    classes (proxies sharded over devices) merge by ``logsumexp`` and their ``extra`` by a sum,
    before this.
    """
    lse, extra = terms[0], terms[1]
    if spec.loss in _ZERO_LOGIT:
        # logaddexp, not softplus: torch's softplus returns x itself past x = 20 (off by e^-20).
        lse = torch.logaddexp(lse, torch.zeros_like(lse))
    return extra + lse


def reduce_terms(
    terms: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    reduction: str = "mean",
    regularizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss from a backend's unreduced similarity terms plus ``spec.tau * regularizer``.

    Row-wise family (MPA-DW, MPA-AP, SoftTriple, ProxyNCA), ``terms`` of shape ``(2, N)``
    (``lse``, ``extra``; see :func:`row_losses`, which makes sample ``i``'s loss ``l_i`` of them):
    ``"none"`` gives ``l_i + tau * R`` (the regulariser ``R`` of eq. 3 does not depend on the
    sample, so every term carries it whole), ``"mean"`` their mean (the loss), ``"sum"`` their
    sum. A weighted mean ``(w * none).sum() / w.sum()`` is the sample-weighted loss.

    Column-wise family (MPA, ProxyAnchor), ``terms`` of shape ``(2, C)`` (``P_c``, ``N_c``):
    ``"none"`` gives class ``c``'s share ``P_c / |C+| + N_c / C + tau * R / C`` of the loss, so
    that their sum is the loss; ``"mean"`` is that loss,
    ``sum_c P_c / |C+| + sum_c N_c / C + tau * R``, with ``C+`` the classes present in ``labels``;
    ``"sum"`` is refused (the loss is already a sum over classes).
    """
    check_reduction(reduction, spec)
    if spec.column_wise:
        pos, neg = terms[0], terms[1]
        c = spec.num_classes
        present = torch.zeros(c, dtype=torch.bool, device=labels.device).index_fill_(0, labels, True)
        count = present.sum()
        if reduction == "none":
            value = pos / count + neg / c
            return value if regularizer is None else value + spec.tau * regularizer / c
        value = pos.sum() / count + neg.sum() / c
    else:
        per_sample = row_losses(terms, spec)
        if reduction == "none":
            value = per_sample
        elif reduction == "sum":
            value = per_sample.sum()
            if regularizer is not None:
                return value + per_sample.shape[0] * spec.tau * regularizer
        else:
            value = per_sample.mean()
    return value if regularizer is None else value + spec.tau * regularizer
