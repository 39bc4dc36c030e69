"""The losses as ``nn.Module``s that own their proxies, called as ``loss_fn(embeddings, labels)``.

``proxies`` is an ``nn.Parameter`` of shape ``(num_classes * proxies_per_class, embedding_size)``
whose row ``c * K + k`` is proxy ``k`` of class ``c``. It keeps the dtype and device it was created
with (or moved to with ``.to()``): the loss never rewrites ``.data``.

A module's hyper-parameters live in one :class:`~mpa_kernels._spec.LossSpec` (``loss_fn.spec``):
the attributes ``alpha``, ``delta``, ``gamma``, ``tau``, ``similarity`` (ProxyNCA: ``scale``) read
it, and assigning one validates the value and replaces the spec. ``num_classes``,
``proxies_per_class`` and ``embedding_size`` are fixed at construction (the proxies' rows are
grouped by them). The repr shows the spec, and the state_dict records it: loading a state of another
loss or shape raises a ``ValueError``, and loading restores the hyper-parameters it recorded.

The call options (``reduction``, ``backend``, ``validate``, ``deterministic``, ``filter_eps``,
``allow_tf32``; see :mod:`mpa_kernels.functional`) are plain attributes, checked at each call.

pytorch-metric-learning compatibility: ``SoftTripleLoss``, ``ProxyAnchorLoss`` and ``ProxyNCALoss``
accept that library's constructor names (``centers_per_class``, ``la``, ``margin``,
``softmax_scale``) and every module its forward signature ``(embeddings, labels, indices_tuple,
ref_emb, ref_labels)``; ``load_pml_state_dict`` imports its proxies.
"""

from __future__ import annotations

import torch
from torch import nn

from mpa_kernels import functional
from mpa_kernels._spec import ComputeOptions, LossSpec, check_int, check_reduction
from mpa_kernels.backends import BackendUnavailableError, _load, check_backend_name

__all__ = [
    "MPALoss",
    "MPADWLoss",
    "MPAAPLoss",
    "SoftTripleLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
]

CALL_OPTIONS = ("reduction", "backend", "validate", "deterministic", "filter_eps", "allow_tf32")


def _call_options(args: dict) -> dict:
    """The call options and factory arguments among a constructor's ``locals()``."""
    return {k: args[k] for k in CALL_OPTIONS + ("device", "dtype")}


def _alias(name: str, value, default, alias: str, alias_value):
    """``alias_value`` if pytorch-metric-learning's name ``alias`` was given, else ``value``."""
    if alias_value is None:
        return value
    if value != default:
        raise TypeError(f"give {name} or its pytorch-metric-learning name {alias}, not both")
    return alias_value


class _Hyper:
    """A hyper-parameter attribute: reads the module's spec; assigning validates and replaces it.
    A module whose loss has no such hyper-parameter refuses both, naming the ones it has."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def _check(self, obj) -> None:
        if self.name not in type(obj)._HYPER:
            raise AttributeError(
                f"{type(obj).__name__} has no hyper-parameter {self.name!r}; its hyper-parameters "
                f"are {', '.join(type(obj)._HYPER)}"
            )

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        self._check(obj)
        return obj._read(self.name)

    def __set__(self, obj, value) -> None:
        self._check(obj)
        obj._spec = LossSpec.from_dict({**obj._spec.to_dict(), **obj._write(self.name, value)})


class _Fixed:
    """A structural attribute, fixed at construction: the proxies' rows are grouped by it."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        if self.name == "embedding_size":
            return obj.proxies.shape[1]
        return getattr(obj._spec, self.name)

    def __set__(self, obj, value) -> None:
        raise AttributeError(
            f"{self.name} of a {type(obj).__name__} is fixed at construction (the proxies' rows "
            "are grouped by num_classes and proxies_per_class); build a new loss instead"
        )


class _ProxyLoss(nn.Module):
    """Owns the proxies and the spec; the computation lives in :mod:`functional`."""

    _loss = ""
    _HYPER: tuple[str, ...] = ("alpha", "delta", "gamma", "tau", "similarity")

    alpha = _Hyper()
    delta = _Hyper()
    gamma = _Hyper()
    tau = _Hyper()
    similarity = _Hyper()
    scale = _Hyper()
    num_classes = _Fixed()
    proxies_per_class = _Fixed()
    embedding_size = _Fixed()

    def __init__(self, spec: LossSpec, embedding_size: int, *, reduction: str, backend: str,
                 validate: bool, deterministic: bool | None, filter_eps: float | None,
                 allow_tf32: bool | None, device: torch.device | str | None,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        check_int("embedding_size", embedding_size)
        check_reduction(reduction, spec)
        check_backend_name(backend)
        if backend != "auto" and _load(backend) is None:
            raise BackendUnavailableError(
                f"backend {backend!r} is not implemented in this version of mpa-kernels"
            )
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be True or False, got {validate!r}")
        ComputeOptions(deterministic, filter_eps, allow_tf32)
        self._spec = spec
        self.reduction, self.backend, self.validate = reduction, backend, validate
        self.deterministic, self.filter_eps, self.allow_tf32 = deterministic, filter_eps, allow_tf32
        self.proxies = nn.Parameter(torch.empty(
            spec.num_classes * spec.proxies_per_class, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def spec(self) -> LossSpec:
        """The loss and its hyper-parameters (read-only; assign the attributes to change them)."""
        return self._spec

    def _read(self, name: str):
        return getattr(self._spec, name)

    def _write(self, name: str, value) -> dict:
        return {name: value}

    def reset_parameters(self) -> None:
        # ProxyAnchor's initialisation; only the direction matters, as proxies are normalised.
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None,
                ref_emb: torch.Tensor | None = None,
                ref_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``embeddings`` (N, d) with integer ``labels`` (N,).

        ``indices_tuple``, ``ref_emb`` and ``ref_labels`` are pytorch-metric-learning's forward
        arguments; they are accepted as ``None`` (``ref_emb is embeddings`` too) and refused
        otherwise, with the reason.
        """
        if indices_tuple is not None:
            raise ValueError(
                "indices_tuple (a miner's output) is not supported: a proxy loss uses every "
                "sample of the batch against every proxy; to weight samples, use "
                "reduction='none' (per-sample terms of the row-wise losses) and weight them"
            )
        if (ref_emb is not None and ref_emb is not embeddings) or (
                ref_labels is not None and ref_labels is not labels):
            raise ValueError(
                "ref_emb/ref_labels are not supported: a proxy loss compares the embeddings with "
                "the proxies, not with a second set of embeddings (pytorch-metric-learning's "
                "proxy losses refuse them too)"
            )
        return functional.proxy_loss(
            embeddings, labels, self.proxies, self._spec, reduction=self.reduction,
            backend=self.backend, validate=self.validate, deterministic=self.deterministic,
            filter_eps=self.filter_eps, allow_tf32=self.allow_tf32,
        )

    def extra_repr(self) -> str:
        fixed = ["num_classes", "embedding_size"]
        if self._spec.proxies_per_class > 1 or "tau" in self._HYPER:
            fixed.append("proxies_per_class")
        parts = [f"{name}={getattr(self, name)!r}" for name in fixed + list(self._HYPER)]
        parts += [f"{name}={getattr(self, name)!r}" for name in CALL_OPTIONS
                  if name in ("reduction", "backend") or getattr(self, name) is not None]
        return ", ".join(parts)

    def get_extra_state(self) -> dict:
        return {"spec": self._spec.to_dict()}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("spec"), dict):
            raise ValueError(f"not the state of an mpa-kernels loss: {state!r}")
        spec = LossSpec.from_dict(state["spec"])
        mine = (self._spec.loss, self._spec.num_classes, self._spec.proxies_per_class)
        theirs = (spec.loss, spec.num_classes, spec.proxies_per_class)
        if mine != theirs:
            raise ValueError(
                f"the state is of a {spec.loss!r} loss with {spec.num_classes} classes x "
                f"{spec.proxies_per_class} proxies; this {type(self).__name__} is {mine[0]!r} "
                f"with {mine[1]} classes x {mine[2]} proxies"
            )
        self._spec = spec


class _MultiProxyLoss(_ProxyLoss):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 10,
        *,
        alpha: float = 32.0,
        delta: float = 0.1,
        gamma: float = 0.1,
        tau: float = 0.2,
        similarity: str = "softmax",
        reduction: str = "mean",
        backend: str = "auto",
        validate: bool = True,
        deterministic: bool | None = None,
        filter_eps: float | None = None,
        allow_tf32: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = LossSpec(self._loss, num_classes, proxies_per_class, alpha, delta, gamma,
                        similarity, tau)
        super().__init__(spec, embedding_size, **_call_options(locals()))


class MPALoss(_MultiProxyLoss):
    """MPA loss (eq. 6-7): class-wise, ProxyAnchor extended to K proxies per class.
    ``reduction="none"`` gives the per-class terms, whose sum is the loss."""

    _loss = "mpa"


class MPADWLoss(_MultiProxyLoss):
    """MPA-DW loss (eq. 12-13): data-wise MPA. ``reduction="none"`` gives per-sample terms."""

    _loss = "mpa_dw"


class MPAAPLoss(_MultiProxyLoss):
    """MPA-AP loss (eq. 15-17): data-wise over all (sample, class) pairs.
    ``reduction="none"`` gives per-sample terms."""

    _loss = "mpa_ap"


class _PMLCounterpart:
    """A loss that pytorch-metric-learning also has: its proxies can be imported."""

    _PML_PARAMETER = "proxies"  # its name in that library's state_dict, shape (C*K, d)

    def load_pml_state_dict(self, state_dict: dict) -> None:
        """Copy the proxies of the same loss from pytorch-metric-learning's ``state_dict()``
        (``SoftTripleLoss.fc``, shape (d, C*K), whose column ``c*K + k`` is centre ``k`` of class
        ``c``; ``ProxyAnchorLoss``/``ProxyNCALoss.proxies``, shape (C, d)) into ``self.proxies``,
        in this module's dtype and device."""
        name = self._PML_PARAMETER
        if name not in state_dict:
            raise ValueError(f"no {name!r} in the state_dict: not a pytorch-metric-learning "
                             f"{type(self).__name__}")
        w = state_dict[name]
        w = w.T if name == "fc" else w
        if tuple(w.shape) != tuple(self.proxies.shape):
            raise ValueError(
                f"pytorch-metric-learning's {name} holds {tuple(state_dict[name].shape)}; this "
                f"{type(self).__name__} needs {tuple(self.proxies.shape)} proxies"
                + (" (as fc, its transpose)" if name == "fc" else "")
            )
        with torch.no_grad():
            self.proxies.copy_(w)


class SoftTripleLoss(_PMLCounterpart, _ProxyLoss):
    """SoftTriple loss (eq. 2-4). ``alpha`` is SoftTriple's ``lambda``; defaults are its paper's.
    ``reduction="none"`` gives per-sample terms.

    pytorch-metric-learning's ``SoftTripleLoss(num_classes, embedding_size, centers_per_class=10,
    la=20, gamma=0.1, margin=0.01)`` is the same loss without the regulariser: pass ``tau=0`` for
    it exactly (its ``gamma`` is the same temperature).
    """

    _loss = "soft_triple"
    _PML_PARAMETER = "fc"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 10,
        *,
        alpha: float = 20.0,
        delta: float = 0.01,
        gamma: float = 0.1,
        tau: float = 0.2,
        similarity: str = "softmax",
        centers_per_class: int | None = None,
        la: float | None = None,
        margin: float | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        validate: bool = True,
        deterministic: bool | None = None,
        filter_eps: float | None = None,
        allow_tf32: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = LossSpec(
            self._loss, num_classes,
            _alias("proxies_per_class", proxies_per_class, 10, "centers_per_class",
                   centers_per_class),
            _alias("alpha", alpha, 20.0, "la", la), _alias("delta", delta, 0.01, "margin", margin),
            gamma, similarity, tau,
        )
        super().__init__(spec, embedding_size, **_call_options(locals()))


class ProxyAnchorLoss(_PMLCounterpart, _ProxyLoss):
    """ProxyAnchor loss (Kim et al. 2020): one proxy per class; MPA with K = 1 and tau = 0.
    ``reduction="none"`` gives the per-class terms, whose sum is the loss.

    pytorch-metric-learning's ``ProxyAnchorLoss(num_classes, embedding_size, margin=0.1,
    alpha=32)``: ``margin`` is ``delta``.
    """

    _loss = "proxy_anchor"
    _HYPER = ("alpha", "delta")

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        alpha: float = 32.0,
        delta: float = 0.1,
        margin: float | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        validate: bool = True,
        deterministic: bool | None = None,
        filter_eps: float | None = None,
        allow_tf32: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = LossSpec(self._loss, num_classes, 1, alpha,
                        _alias("delta", delta, 0.1, "margin", margin))
        super().__init__(spec, embedding_size, **_call_options(locals()))


class ProxyNCALoss(_PMLCounterpart, _ProxyLoss):
    """ProxyNCA loss (ProxyNCA++ form): cross-entropy over ``-scale * ||x - w_c||^2``.
    ``reduction="none"`` gives per-sample terms.

    pytorch-metric-learning's ``ProxyNCALoss(num_classes, embedding_size, softmax_scale=1)``:
    ``softmax_scale`` is ``scale`` (whose default here is ProxyNCA++'s 9).
    """

    _loss = "proxy_nca"
    _HYPER = ("scale",)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 9.0,
        softmax_scale: float | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        validate: bool = True,
        deterministic: bool | None = None,
        filter_eps: float | None = None,
        allow_tf32: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        scale = _alias("scale", scale, 9.0, "softmax_scale", softmax_scale)
        spec = LossSpec(self._loss, num_classes, 1, functional.nca_alpha(scale), 0.0)
        super().__init__(spec, embedding_size, **_call_options(locals()))

    def _read(self, name: str):
        return self._spec.alpha / 2.0

    def _write(self, name: str, value) -> dict:
        return {"alpha": functional.nca_alpha(value)}
