"""What a backend is asked to compute: one frozen description of a loss and its hyper-parameters.

:class:`LossSpec` is the one description of a loss: the modules hold one (their hyper-parameter
attributes read and replace it, their repr and state_dict record it), the functional wrappers build
one, and backends receive it (the backend contract is in :mod:`mpa_kernels.backends`).
:class:`ComputeOptions` says how to compute it (determinism, gradient filtering, TF32); backends
that have no such knob ignore it.

The six losses fall into two families, which is how the kernels and the reductions are organised:

* column-wise, one log-sum-exp per class over samples: ``mpa``, ``proxy_anchor``;
* row-wise, one log-sum-exp per sample over classes: ``mpa_dw``, ``mpa_ap``, ``soft_triple``,
  ``proxy_nca``. ``proxy_nca`` reaches backends in the form of ``soft_triple`` (a cross-entropy
  over ``alpha * S``) with ``K = 1``, ``delta = 0`` and ``alpha = 2 * scale``, because
  ``-scale * ||x - w||^2 = 2 * scale * s - 2 * scale`` and the constant cancels in the softmax.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

LOSSES = ("mpa", "mpa_dw", "mpa_ap", "soft_triple", "proxy_anchor", "proxy_nca")
COLUMN_WISE = frozenset({"mpa", "proxy_anchor"})
SIMILARITIES = ("softmax", "max", "mean")
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossSpec:
    """A loss and its hyper-parameters, as backends see it.

    ``alpha`` is the scale of the logits (``alpha`` of MPA/ProxyAnchor, ``la`` of SoftTriple,
    ``2 * scale`` of ProxyNCA); ``delta`` the margin; ``gamma`` the temperature of the intra-class
    softmax over the ``proxies_per_class`` proxies of a class; ``tau`` the weight of the proxy
    regulariser (eq. 3), which the front end (or a backend's ``proxy_terms``) adds.

    ``shard=True`` describes a shard of a larger loss's classes (class-parallel proxies: one
    rank's ``num_classes``, which may be 1), for the backend's unreduced terms; a whole loss needs
    at least two classes. :meth:`shard_of` builds one.
    """

    loss: str
    num_classes: int
    proxies_per_class: int
    alpha: float
    delta: float
    gamma: float = 0.1
    similarity: str = "softmax"
    tau: float = 0.0
    shard: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.shard, bool):
            raise TypeError(f"shard must be True or False, got {self.shard!r}")
        check_loss_hyperparameters(
            self.loss, self.num_classes, self.proxies_per_class, self.alpha, self.delta,
            self.gamma, self.tau, self.similarity, min_classes=1 if self.shard else 2,
        )
        for name in ("alpha", "delta", "gamma", "tau"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def column_wise(self) -> bool:
        return self.loss in COLUMN_WISE

    def shard_of(self, num_classes: int) -> "LossSpec":
        """This loss narrowed to ``num_classes`` of its classes (at least one), as a shard."""
        return dataclasses.replace(self, num_classes=num_classes, shard=True)

    def to_dict(self) -> dict:
        """Plain str/int/float values (what a state_dict records; loads with weights_only). A
        whole loss's record has no ``shard`` entry, as before shards existed."""
        values = dataclasses.asdict(self)
        if not self.shard:
            del values["shard"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "LossSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"not fields of a LossSpec: {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class ComputeOptions:
    """How to compute a loss, per call; ``None`` takes the backend's module-level default.

    * ``deterministic``: no order-dependent atomics (a bitwise-reproducible backward);
    * ``filter_eps``: skip backward tiles whose class-level weights are all below it (gradient
      filtering; the loss stays exact);
    * ``allow_tf32``: TF32 dots for fp32 inputs.

    Honoured by the ``"triton-linear"`` backend. The others ignore them: ``"reference"`` and
    ``"torch"`` are deterministic for a given device and thread count and never filter; their
    fp32 matmuls on CUDA follow ``torch.backends.cuda.matmul.allow_tf32``.
    """

    deterministic: bool | None = None
    filter_eps: float | None = None
    allow_tf32: bool | None = None

    def __post_init__(self) -> None:
        for name in ("deterministic", "allow_tf32"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be True, False or None, got {value!r}")
        if self.filter_eps is not None:
            check_number("filter_eps", self.filter_eps, nonnegative=True)

    def for_backend(self, module) -> dict:
        """The options ``module`` declares in its ``OPTIONS``, as keyword arguments; unset ones
        are left out so that the backend's defaults apply."""
        honoured = getattr(module, "OPTIONS", ())
        return {name: getattr(self, name) for name in honoured if getattr(self, name) is not None}


def check_reduction(reduction: str, spec: LossSpec) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if reduction == "sum" and spec.column_wise:
        raise ValueError(
            f"reduction='sum' has no meaning for {spec.loss!r}: its loss is already a sum over "
            "classes (positive terms over the classes in the batch, negative terms over all "
            "classes); reduction='none' gives the per-class terms whose sum is the loss"
        )


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
    *,
    min_classes: int = 2,
) -> None:
    """Raise a ``ValueError``/``TypeError`` that names the first bad hyper-parameter."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    check_int("num_classes", num_classes, min_classes)
    check_int("proxies_per_class", proxies_per_class, 1)
    check_number("alpha", alpha, positive=True)
    check_number("delta", delta)
    check_number("gamma", gamma, positive=True)
    check_number("tau", tau, nonnegative=True)
    if not isinstance(similarity, str) or similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
