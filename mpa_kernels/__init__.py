"""mpa-kernels: fused proxy-based deep-metric-learning losses (MPA, MPA-DW, MPA-AP and baselines).

>>> import torch, mpa_kernels
>>> loss_fn = mpa_kernels.MPAAPLoss(num_classes=100, embedding_size=512, proxies_per_class=10)
>>> loss = loss_fn(torch.randn(32, 512), torch.randint(0, 100, (32,)))
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# Packages that live in top-level folders of the repository and install as mpa_kernels.<name>
# (pyproject.toml's package-dir), so that the wheel adds no generic top-level names.
_MAPPED = ("reference", "training", "benchmarks")


class _SourceCheckoutFinder(importlib.abc.MetaPathFinder):
    """Maps ``mpa_kernels.<name>`` onto ``<repository>/<name>/`` in a source checkout that is run
    without installing it (``PYTHONPATH=.``), the same mapping setuptools makes when installing.
    First on ``sys.meta_path`` so that this checkout wins over another one installed in editable
    mode."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in _MAPPED:
            return None
        folder = self.root / name
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


def _map_source_checkout() -> None:
    here = Path(__file__).resolve().parent
    root = here.parent
    installed = (here / "reference").is_dir()
    if installed or not (root / "reference" / "__init__.py").is_file():
        return
    if not any(isinstance(f, _SourceCheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceCheckoutFinder(root))


_map_source_checkout()

from mpa_kernels import backends, functional, metrics  # noqa: E402
from mpa_kernels._spec import ComputeOptions, LossSpec  # noqa: E402
from mpa_kernels.backends import BACKENDS, BackendUnavailableError, auto_backend  # noqa: E402
from mpa_kernels.losses import (  # noqa: E402
    MPAAPLoss,
    MPADWLoss,
    MPALoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
)

# The backends that "auto" picks on the CPU, imported now (they are plain PyTorch) rather than at the
# first call: torch.compile cannot trace an import, so a model whose first call is compiled with
# fullgraph=True would break there. The Triton backends stay lazy (they need Triton and a GPU).
for _name in ("torch", "reference"):
    backends._load(_name)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ComputeOptions",
    "LossSpec",
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
