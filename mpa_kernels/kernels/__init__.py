"""Triton kernels: :mod:`.common` (device helpers shared by both levels), :mod:`.similarity`
(kernels over the similarity tensor s = x_hat @ w_hat.T), :mod:`.linear` (fused-linear kernels
that compute tiles of s themselves), :mod:`.launch` (the host side both share: the compiled-variant
record, split planning and the merge of split partials into terms) and :mod:`.compile_check`
(compiles every specialisation the launchers can produce for sm_80 and sm_90, without a GPU).

Importing this package imports no Triton module, so that the library loads where Triton is absent.
"""

import os


def triton_interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
