"""What a backend is asked to compute: one frozen description of a loss and its hyper-parameters.

Every backend implements one function, ``similarity_loss(x_hat, w_hat, labels, spec)``, that returns
the scalar similarity term of ``spec.loss`` from L2-normalised embeddings ``x_hat`` (N, d) and
L2-normalised proxies ``w_hat`` (C*K, d), differentiable in both. The proxy regulariser (eq. 3) is
cheap (C*K*K*d) and is added by the front end, the same for every backend.

The six losses fall into two families (GUIDE.md), which is how the kernels are organised:

* column-wise, one log-sum-exp per class over samples: ``mpa``, ``proxy_anchor``;
* row-wise, one log-sum-exp per sample over classes: ``mpa_dw``, ``mpa_ap``, ``soft_triple``,
  ``proxy_nca``. ``proxy_nca`` reaches backends in the form of ``soft_triple`` (a cross-entropy
  over ``alpha * S``) with ``K = 1``, ``delta = 0`` and ``alpha = 2 * scale``, because
  ``-scale * ||x - w||^2 = 2 * scale * s - 2 * scale`` and the constant cancels in the softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOSSES = ("mpa", "mpa_dw", "mpa_ap", "soft_triple", "proxy_anchor", "proxy_nca")
COLUMN_WISE = frozenset({"mpa", "proxy_anchor"})
SIMILARITIES = ("softmax", "max", "mean")


@dataclass(frozen=True)
class LossSpec:
    """A loss and its hyper-parameters, as backends see it.

    ``alpha`` is the scale of the logits (``alpha`` of MPA/ProxyAnchor, ``la`` of SoftTriple,
    ``2 * scale`` of ProxyNCA); ``delta`` the margin; ``gamma`` the temperature of the intra-class
    softmax over the ``proxies_per_class`` proxies of a class.
    """

    loss: str
    num_classes: int
    proxies_per_class: int
    alpha: float
    delta: float
    gamma: float = 0.1
    similarity: str = "softmax"

    def __post_init__(self) -> None:
        check_loss_hyperparameters(
            self.loss, self.num_classes, self.proxies_per_class, self.alpha, self.delta,
            self.gamma, 0.0, self.similarity,
        )

    @property
    def column_wise(self) -> bool:
        return self.loss in COLUMN_WISE


def check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else a named error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_loss_hyperparameters(
    loss: str,
    num_classes: int,
    proxies_per_class: int,
    alpha: float,
    delta: float,
    gamma: float,
    tau: float,
    similarity: str,
) -> None:
    """Raise a ``ValueError``/``TypeError`` that names the first bad hyper-parameter."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    check_int("num_classes", num_classes, 2)
    check_int("proxies_per_class", proxies_per_class, 1)
    check_number("alpha", alpha, positive=True)
    check_number("delta", delta)
    check_number("gamma", gamma, positive=True)
    check_number("tau", tau, nonnegative=True)
    if not isinstance(similarity, str) or similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
