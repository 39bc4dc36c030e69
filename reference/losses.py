"""Reference implementations of the losses of "Multi Proxy Anchor Family Loss for Several Types of
Gradients" (Saeki, Kawahara, Aman, 2023) and the baselines it is measured against.

Conventions shared by every function here (they are also the library's):

* ``embeddings`` is ``(N, d)``, ``labels`` is ``(N,)`` of integers in ``[0, C)``, ``proxies`` is
  ``(C * K, d)`` and row ``c * K + k`` is proxy ``k`` of class ``c``.
* Embeddings and proxies are L2-normalised here, so ``s_ick = x_i . w_ck`` is a cosine similarity.
* Every ``log(1 + sum(exp(z)))`` is a log-sum-exp with an implicit zero logit
  (:func:`log1p_sum_exp`), never raw exponentials: ``alpha * (S + delta)`` reaches 35 and
  ``exp(35)`` overflows fp16.
* ``alpha = 32`` by default: the paper does not state its scale; 32 is ProxyAnchor's.
* Losses are means over the batch (data-wise) or, for the class-wise MPA, the positive term is
  averaged over the classes present in the batch and the negative term over *all* classes
  (ProxyAnchor's own convention, so that MPA with ``K = 1`` and ``tau = 0`` *is* ProxyAnchor).

These functions do no input validation; :mod:`mpa_kernels` does it before it calls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "log1p_sum_exp",
    "class_similarity",
    "proxy_regularizer",
    "soft_triple_similarity_terms",
    "soft_triple_similarity_loss",
    "soft_triple_loss",
    "mpa_similarity_terms",
    "mpa_similarity_loss",
    "mpa_loss",
    "mpa_dw_similarity_terms",
    "mpa_dw_similarity_loss",
    "mpa_dw_loss",
    "mpa_ap_similarity_terms",
    "mpa_ap_similarity_loss",
    "mpa_ap_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
]

# Added under the square root of eq. 3 so that two identical proxies give a finite gradient.
REGULARIZER_EPS = 1e-12


def log1p_sum_exp(z: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """``log(1 + sum_{j in mask} exp(z_j))`` along ``dim``, as a log-sum-exp with a zero logit.

    An empty mask gives ``log(1) = 0`` exactly, which is what eq. 6 asks of a class with no
    positive (or no negative) in the batch.
    """
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    shape = list(z.shape)
    shape[dim] = 1
    zero = z.new_zeros(shape)
    return torch.logsumexp(torch.cat([zero, z], dim=dim), dim=dim)


def class_similarity(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    proxies_per_class: int,
    similarity: str = "softmax",
    gamma: float = 0.1,
    normalise: bool = True,
) -> torch.Tensor:
    """Similarity ``S(x_i, c)`` between each sample and each class, eq. 1. Returns ``(N, C)``.

    ``similarity="softmax"`` is eq. 1: ``S_ic = sum_k softmax_k(s_ick / gamma) * s_ick``.
    ``"max"`` (``max_k s_ick``) and ``"mean"`` (``mean_k s_ick``) are the alternatives the paper
    mentions. With one proxy per class every mode gives ``S = s``. ``normalise=False`` is for
    rows that are unit vectors already: normalising them again changes no value but divides the
    gradient of a clamped (zero) row by ``eps`` a second time.
    """
    x, w = embeddings, proxies
    if normalise:
        x, w = F.normalize(x, dim=1), F.normalize(w, dim=1)
    s = (x @ w.T).view(x.shape[0], -1, proxies_per_class)  # (N, C, K)
    if similarity == "softmax":
        p = torch.softmax(s / gamma, dim=2)
        return (p * s).sum(dim=2)
    if similarity == "max":
        return s.max(dim=2).values
    if similarity == "mean":
        return s.mean(dim=2)
    raise ValueError(f"unknown similarity {similarity!r}; expected 'softmax', 'max' or 'mean'")


def proxy_regularizer(proxies: torch.Tensor, proxies_per_class: int) -> torch.Tensor:
    """Proxy regulariser, eq. 3.

    ``sum_c sum_{t<s} sqrt(2 - 2 w_cs . w_ct) / (C * K * (K - 1))`` over normalised proxies, with
    :data:`REGULARIZER_EPS` under the root. It is ``0`` when ``K = 1`` (there are no pairs).
    """
    k = proxies_per_class
    if k == 1:
        return proxies.sum() * 0.0  # keeps the graph (and the device/dtype) of the proxies
    w = F.normalize(proxies, dim=1).view(-1, k, proxies.shape[1])  # (C, K, d)
    c = w.shape[0]
    sims = w @ w.transpose(1, 2)  # (C, K, K)
    t, s = torch.triu_indices(k, k, offset=1, device=proxies.device)
    pair_sims = sims[:, t, s].clamp(max=1.0)
    return torch.sqrt(2.0 - 2.0 * pair_sims + REGULARIZER_EPS).sum() / (c * k * (k - 1))


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).bool()


def soft_triple_similarity_terms(
    S: torch.Tensor, labels: torch.Tensor, la: float = 20.0, delta: float = 0.01
) -> torch.Tensor:
    """SoftTriple's per-sample terms, eq. 2, shape ``(N,)``.

    ``L_i = -log( exp(la (S_iy - delta)) / (exp(la (S_iy - delta)) + sum_{c != y} exp(la S_ic)) )``,
    a cross-entropy over the logits ``la * (S - delta * onehot(y))``.
    """
    logits = la * (S - delta * _one_hot(labels, S.shape[1]).to(S.dtype))
    return torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)


def soft_triple_similarity_loss(
    S: torch.Tensor, labels: torch.Tensor, la: float = 20.0, delta: float = 0.01
) -> torch.Tensor:
    """SoftTriple similarity loss, eq. 2, averaged over the batch.

    The paper sums over the batch in eq. 4; like SoftTriple's own code we take the mean.
    """
    return soft_triple_similarity_terms(S, labels, la, delta).mean()


def soft_triple_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxies_per_class: int,
    la: float = 20.0,
    delta: float = 0.01,
    gamma: float = 0.1,
    tau: float = 0.2,
    similarity: str = "softmax",
) -> torch.Tensor:
    """SoftTriple loss, eq. 4: eq. 2 (batch mean) ``+ tau *`` eq. 3.

    Defaults are SoftTriple's paper's (``la = 20``, ``delta = 0.01``, ``gamma = 0.1``,
    ``tau = 0.2``).
    """
    S = class_similarity(embeddings, proxies, proxies_per_class, similarity, gamma)
    return soft_triple_similarity_loss(S, labels, la, delta) + tau * proxy_regularizer(
        proxies, proxies_per_class
    )


def mpa_similarity_terms(
    S: torch.Tensor, labels: torch.Tensor, alpha: float = 32.0, delta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """MPA's per-class terms, eq. 6: ``(P, N)``, each of shape ``(C,)``.

    ``P_c = log(1 + sum_{i: y_i = c} exp(-alpha (S_ic - delta)))`` (exactly 0 for a class with no
    sample in the batch) and ``N_c = log(1 + sum_{i: y_i != c} exp(alpha (S_ic + delta)))``.
    """
    pos = _one_hot(labels, S.shape[1])  # (N, C)
    P = log1p_sum_exp(-alpha * (S - delta), pos, dim=0)
    Nc = log1p_sum_exp(alpha * (S + delta), ~pos, dim=0)
    return P, Nc


def mpa_similarity_loss(
    S: torch.Tensor, labels: torch.Tensor, alpha: float = 32.0, delta: float = 0.1
) -> torch.Tensor:
    """MPA similarity loss, eq. 6 (class-wise).

    ``L = sum_{c in C+} P_c / |C+| + sum_c N_c / C`` over the terms of
    :func:`mpa_similarity_terms`, with ``C+`` the classes that have a positive in the batch and
    ``C`` the number of all classes (ProxyAnchor's convention for ``|C-|``).
    """
    P, Nc = mpa_similarity_terms(S, labels, alpha, delta)
    present = _one_hot(labels, S.shape[1]).any(dim=0)
    return P.sum() / present.sum() + Nc.sum() / S.shape[1]


def mpa_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxies_per_class: int,
    alpha: float = 32.0,
    delta: float = 0.1,
    gamma: float = 0.1,
    tau: float = 0.2,
    similarity: str = "softmax",
) -> torch.Tensor:
    """MPA loss, eq. 7: eq. 6 ``+ tau *`` eq. 3."""
    S = class_similarity(embeddings, proxies, proxies_per_class, similarity, gamma)
    return mpa_similarity_loss(S, labels, alpha, delta) + tau * proxy_regularizer(
        proxies, proxies_per_class
    )


def mpa_dw_similarity_terms(
    S: torch.Tensor, labels: torch.Tensor, alpha: float = 32.0, delta: float = 0.1
) -> torch.Tensor:
    """MPA-DW's per-sample terms, eq. 12, shape ``(N,)``:
    ``log(1 + exp(-alpha (S_iy - delta))) + log(1 + sum_{c != y} exp(alpha (S_ic + delta)))``.
    """
    pos = _one_hot(labels, S.shape[1])
    s_pos = S.gather(1, labels[:, None]).squeeze(1)
    pos_term = F.softplus(-alpha * (s_pos - delta))
    neg_term = log1p_sum_exp(alpha * (S + delta), ~pos, dim=1)
    return pos_term + neg_term


def mpa_dw_similarity_loss(
    S: torch.Tensor, labels: torch.Tensor, alpha: float = 32.0, delta: float = 0.1
) -> torch.Tensor:
    """MPA-DW similarity loss, eq. 12 (data-wise): the mean of :func:`mpa_dw_similarity_terms`."""
    return mpa_dw_similarity_terms(S, labels, alpha, delta).mean()


def mpa_dw_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxies_per_class: int,
    alpha: float = 32.0,
    delta: float = 0.1,
    gamma: float = 0.1,
    tau: float = 0.2,
    similarity: str = "softmax",
) -> torch.Tensor:
    """MPA-DW loss, eq. 13: eq. 12 ``+ tau *`` eq. 3."""
    S = class_similarity(embeddings, proxies, proxies_per_class, similarity, gamma)
    return mpa_dw_similarity_loss(S, labels, alpha, delta) + tau * proxy_regularizer(
        proxies, proxies_per_class
    )


def mpa_ap_similarity_terms(
    S: torch.Tensor, labels: torch.Tensor, alpha: float = 32.0, delta: float = 0.1
) -> torch.Tensor:
    """MPA-AP's per-sample terms, eq. 15-16, shape ``(N,)``.

    ``S'_ic = delta - S_ic`` if ``c = y_i`` else ``S_ic + delta`` (eq. 15), and
    ``L_i = log(1 + sum_c exp(alpha S'_ic))`` (eq. 16).
    """
    pos = _one_hot(labels, S.shape[1])
    S_margin = torch.where(pos, delta - S, S + delta)
    return log1p_sum_exp(alpha * S_margin, dim=1)


def mpa_ap_similarity_loss(
    S: torch.Tensor, labels: torch.Tensor, alpha: float = 32.0, delta: float = 0.1
) -> torch.Tensor:
    """MPA-AP similarity loss, eq. 16 (data-wise, all pairs): the mean of
    :func:`mpa_ap_similarity_terms`."""
    return mpa_ap_similarity_terms(S, labels, alpha, delta).mean()


def mpa_ap_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxies_per_class: int,
    alpha: float = 32.0,
    delta: float = 0.1,
    gamma: float = 0.1,
    tau: float = 0.2,
    similarity: str = "softmax",
) -> torch.Tensor:
    """MPA-AP loss, eq. 17: eq. 16 ``+ tau *`` eq. 3."""
    S = class_similarity(embeddings, proxies, proxies_per_class, similarity, gamma)
    return mpa_ap_similarity_loss(S, labels, alpha, delta) + tau * proxy_regularizer(
        proxies, proxies_per_class
    )


def proxy_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    alpha: float = 32.0,
    delta: float = 0.1,
) -> torch.Tensor:
    """ProxyAnchor loss (Kim et al. 2020): eq. 6 with one proxy per class and ``S = s``.

    Written out on its own (not as a call to :func:`mpa_loss`) so that the test "MPA with K = 1
    and tau = 0 equals ProxyAnchor" compares two independent expressions.
    """
    x = F.normalize(embeddings, dim=1)
    w = F.normalize(proxies, dim=1)
    s = x @ w.T  # (N, C)
    num_classes = s.shape[1]
    pos = _one_hot(labels, num_classes)
    pos_term = torch.stack(
        [log1p_sum_exp(-alpha * (s[pos[:, c], c] - delta)) for c in range(num_classes)]
    )
    neg_term = torch.stack(
        [log1p_sum_exp(alpha * (s[~pos[:, c], c] + delta)) for c in range(num_classes)]
    )
    num_present = len(torch.unique(labels))
    return pos_term.sum() / num_present + neg_term.sum() / num_classes


def proxy_nca_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    scale: float = 9.0,
) -> torch.Tensor:
    """ProxyNCA loss (Movshovitz-Attias et al. 2017) in the form of ProxyNCA++ and
    pytorch-metric-learning: a softmax over ``-scale * ||x_i - w_c||^2`` of normalised vectors,
    positive proxy included in the denominator, averaged over the batch.

    ``L_i = -log( exp(-scale d_iy) / sum_c exp(-scale d_ic) )``, ``d_ic = ||x_i - w_c||^2``.
    The default ``scale = 9`` is ProxyNCA++'s temperature of 1/9.
    """
    x = F.normalize(embeddings, dim=1)
    w = F.normalize(proxies, dim=1)
    d = (x * x).sum(1)[:, None] + (w * w).sum(1)[None, :] - 2.0 * x @ w.T
    return F.cross_entropy(-scale * d, labels)
