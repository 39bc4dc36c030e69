"""The oracle: plain, obviously-correct PyTorch, one function per equation of the paper.

Slow by design. Every backend of :mod:`mpa_kernels` is tested against these functions, and this
package imports nothing from :mod:`mpa_kernels`.
"""

from .losses import (
    class_similarity,
    log1p_sum_exp,
    mpa_ap_loss,
    mpa_ap_similarity_loss,
    mpa_ap_similarity_terms,
    mpa_dw_loss,
    mpa_dw_similarity_loss,
    mpa_dw_similarity_terms,
    mpa_loss,
    mpa_similarity_loss,
    mpa_similarity_terms,
    proxy_anchor_loss,
    proxy_nca_loss,
    proxy_regularizer,
    soft_triple_loss,
    soft_triple_similarity_loss,
    soft_triple_similarity_terms,
)

__all__ = [
    "class_similarity",
    "log1p_sum_exp",
    "mpa_ap_loss",
    "mpa_ap_similarity_loss",
    "mpa_ap_similarity_terms",
    "mpa_dw_loss",
    "mpa_dw_similarity_loss",
    "mpa_dw_similarity_terms",
    "mpa_loss",
    "mpa_similarity_loss",
    "mpa_similarity_terms",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "proxy_regularizer",
    "soft_triple_loss",
    "soft_triple_similarity_loss",
    "soft_triple_similarity_terms",
]
