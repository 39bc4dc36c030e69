"""The losses as ``nn.Module``s that own their proxies, called as ``loss_fn(embeddings, labels)``.

``proxies`` is an ``nn.Parameter`` of shape ``(num_classes * proxies_per_class, embedding_size)``
whose row ``c * K + k`` is proxy ``k`` of class ``c``. It keeps the dtype and device it was created
with (or moved to with ``.to()``): the loss never rewrites ``.data``.
"""

from __future__ import annotations

import torch
from torch import nn

from mpa_kernels import functional
from mpa_kernels._spec import check_int, check_loss_hyperparameters, check_number
from mpa_kernels.backends import BackendUnavailableError, _load, check_backend_name

__all__ = [
    "MPALoss",
    "MPADWLoss",
    "MPAAPLoss",
    "SoftTripleLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
]


class _ProxyLoss(nn.Module):
    """Owns the proxies and the hyper-parameters; the computation lives in :mod:`functional`."""

    _loss = ""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int,
        alpha: float,
        delta: float,
        gamma: float,
        tau: float,
        similarity: str,
        backend: str,
        validate: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        check_loss_hyperparameters(
            self._loss, num_classes, proxies_per_class, alpha, delta, gamma, tau, similarity
        )
        check_int("embedding_size", embedding_size)
        check_backend_name(backend)
        if backend != "auto" and _load(backend) is None:
            raise BackendUnavailableError(
                f"backend {backend!r} is not implemented in this version of mpa-kernels"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.proxies_per_class = proxies_per_class
        self.alpha, self.delta, self.gamma, self.tau = alpha, delta, gamma, tau
        self.similarity = similarity
        self.backend = backend
        self.validate = validate
        self.proxies = nn.Parameter(
            torch.empty(num_classes * proxies_per_class, embedding_size, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # ProxyAnchor's initialisation; only the direction matters, as proxies are normalised.
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional._proxy_loss(
            self._loss, embeddings, labels, self.proxies, self.proxies_per_class, self.alpha,
            self.delta, self.gamma, self.tau, self.similarity, self.backend, self.validate,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"proxies_per_class={self.proxies_per_class}, alpha={self.alpha}, "
            f"delta={self.delta}, gamma={self.gamma}, tau={self.tau}, "
            f"similarity={self.similarity!r}, backend={self.backend!r}"
        )


class _MultiProxyLoss(_ProxyLoss):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 10,
        alpha: float = 32.0,
        delta: float = 0.1,
        gamma: float = 0.1,
        tau: float = 0.2,
        similarity: str = "softmax",
        backend: str = "auto",
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, proxies_per_class, alpha, delta, gamma, tau,
                         similarity, backend, validate, device, dtype)


class MPALoss(_MultiProxyLoss):
    """MPA loss (eq. 6-7): class-wise, ProxyAnchor extended to K proxies per class."""

    _loss = "mpa"


class MPADWLoss(_MultiProxyLoss):
    """MPA-DW loss (eq. 12-13): data-wise MPA."""

    _loss = "mpa_dw"


class MPAAPLoss(_MultiProxyLoss):
    """MPA-AP loss (eq. 15-17): data-wise over all (sample, class) pairs."""

    _loss = "mpa_ap"


class SoftTripleLoss(_ProxyLoss):
    """SoftTriple loss (eq. 2-4). ``alpha`` is SoftTriple's ``lambda``; defaults are its paper's."""

    _loss = "soft_triple"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 10,
        alpha: float = 20.0,
        delta: float = 0.01,
        gamma: float = 0.1,
        tau: float = 0.2,
        similarity: str = "softmax",
        backend: str = "auto",
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, proxies_per_class, alpha, delta, gamma, tau,
                         similarity, backend, validate, device, dtype)


class ProxyAnchorLoss(_ProxyLoss):
    """ProxyAnchor loss (Kim et al. 2020): one proxy per class; MPA with K = 1 and tau = 0."""

    _loss = "proxy_anchor"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        alpha: float = 32.0,
        delta: float = 0.1,
        backend: str = "auto",
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, 1, alpha, delta, 0.1, 0.0, "softmax",
                         backend, validate, device, dtype)


class ProxyNCALoss(_ProxyLoss):
    """ProxyNCA loss (ProxyNCA++ form): cross-entropy over ``-scale * ||x - w_c||^2``."""

    _loss = "proxy_nca"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 9.0,
        backend: str = "auto",
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_number("scale", scale, positive=True)
        super().__init__(num_classes, embedding_size, 1, 2.0 * scale, 0.0, 0.1, 0.0, "softmax",
                         backend, validate, device, dtype)
        self.scale = scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.proxy_nca_loss(
            embeddings, labels, self.proxies, scale=self.scale, backend=self.backend,
            validate=self.validate,
        )
