"""The native loops of the ``"torch"`` backend (``torch_native.cpp``), built on first use.

The chunk sweep's work between its GEMMs is a handful of elementwise passes and short reductions
over each chunk's similarities; as eager ATen ops it is some ten passes and ~100 dispatches per
chunk, which at the paper's shapes cost as much as a fifth of the GEMMs. The C++ file does each
visit's share in one pass. It is compiled by :func:`torch.utils.cpp_extension.load` the first time
the backend runs (about half a minute; cached afterwards under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), for the vector instructions ATen itself uses on this CPU.

Besides the sweep's buffers, the loops use scratch of one chunk row per thread (m*K numbers:
kilobytes), from the C++ heap rather than torch's allocator.

Where it cannot be built (no C++ compiler or ninja, a failed build) the backend keeps its eager
ops, which compute the same numbers more slowly; :func:`status` says which path runs and why, and
``MPA_KERNELS_NATIVE=0`` in the environment chooses the eager ops without trying.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).with_name("torch_native.cpp")
# ATen's vector headers pick their instruction set from these macros; the flags must match them.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}

_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None
_tried = False
_log = logging.getLogger(__name__)


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def build(source: Path = _SOURCE, tag: str = "") -> ModuleType:
    """The extension compiled from ``source`` (this package's loops unless told otherwise; a
    benchmark builds another revision's with a ``tag`` of its own, so that both can be loaded)."""
    from torch.utils import cpp_extension

    capability = _capability()
    flags = ["-O3", *_CAPABILITY_FLAGS.get(capability, [])]
    if torch._C.has_openmp:
        # at::parallel_for is inline OpenMP in ATen's headers: without the flag its loops run on
        # one thread. Not linked: the symbols resolve to the runtime torch has already loaded, so
        # there is one thread pool, not two.
        flags.append("-fopenmp")
    _log.info("building the torch backend's native loops for %s (once, about half a minute)",
              capability)
    return cpp_extension.load(name=f"mpa_kernels_native{tag}_{capability.lower()}",
                              sources=[str(source)], extra_cflags=flags, verbose=False)


def module() -> ModuleType | None:
    """The built extension, or None where it is switched off or cannot be built (see status)."""
    global _module, _reason, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("MPA_KERNELS_NATIVE", "1").strip() == "0":
            _reason = "switched off by MPA_KERNELS_NATIVE=0"
        else:
            try:
                _module = build()
            except Exception as error:  # a missing compiler or ninja, a failed build: eager ops
                _reason = f"could not be built ({type(error).__name__}: {error})".strip()
                warnings.warn(
                    f"mpa_kernels: the torch backend's native CPU loops {_reason[:500]}; it uses "
                    "its eager ops instead (the same numbers, slower)", RuntimeWarning,
                    stacklevel=3)
        _tried = True
    return _module


def status() -> str:
    """Which path the ``"torch"`` backend's chunk loops take: "native (<capability>)", or
    "eager: <why>". Builds the extension if it has not been tried yet."""
    return f"native ({_capability()})" if module() is not None else f"eager: {_reason}"
