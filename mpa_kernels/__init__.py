"""mpa-kernels: fused proxy-based deep-metric-learning losses (MPA, MPA-DW, MPA-AP and baselines).

>>> import torch, mpa_kernels
>>> loss_fn = mpa_kernels.MPAAPLoss(num_classes=100, embedding_size=512, proxies_per_class=10)
>>> loss = loss_fn(torch.randn(32, 512), torch.randint(0, 100, (32,)))
"""

from mpa_kernels import functional, metrics
from mpa_kernels.backends import BACKENDS, BackendUnavailableError, auto_backend
from mpa_kernels.losses import (
    MPAAPLoss,
    MPADWLoss,
    MPALoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "MPAAPLoss",
    "MPADWLoss",
    "MPALoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "auto_backend",
    "functional",
    "metrics",
]
