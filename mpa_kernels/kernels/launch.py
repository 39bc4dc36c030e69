"""What both kernel modules (:mod:`.similarity`, :mod:`.linear`) share on the host side: the record
of a compiled variant and its launch, the dtypes the kernels take, the plan of how a forward's swept
dimension is split over programs, and the merge of the split partials into the terms of the
backends' contract (a small kernel and its launcher).

A forward pass of either module owns rows (row-wise family) or classes (column-wise family) and
sweeps the other dimension; when the owned dimension alone would leave the GPU idle (N = 256 rows
are a handful of programs) the sweep is split into ranges, and each program writes partials
``part[2, splits, M]`` (fp32, ``M`` = N rows or C classes): row 0 a partial log-sum-exp without the
zero logit, row 1 the row-wise positive term (or, column-wise, the negatives' partial LSE).
:func:`merge_splits` turns them into the ``(2, M)`` terms.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mpa_kernels.kernels.common import lse_finalize, online_lse_update, softplus

# The input dtypes the kernels compile for, with Triton's names for them.
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Specialisation:
    """One compiled variant of a kernel: what the launcher launches and the compile check builds."""

    name: str
    kernel: object  # triton.JITFunction
    arg_types: tuple  # ((name, triton type), ...) of the runtime arguments, in order
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int = 3  # software-pipelining depth of the loops over tl.dot (Triton's default)
    maxnreg: int | None = None  # register budget per thread given to ptxas; None: its own choice

    def signature(self) -> dict:
        """Triton's signature dict: runtime argument types, then ``"constexpr"`` for the rest."""
        sig = dict(self.arg_types)
        sig.update({name: "constexpr" for name, _ in self.constexprs})
        return sig

    def options(self) -> tuple:
        """The compile options besides the constexprs, as ``(name, value)`` pairs."""
        budget = () if self.maxnreg is None else (("maxnreg", self.maxnreg),)
        return ("num_warps", self.num_warps), ("num_stages", self.num_stages), *budget

    def launch(self, grid, *args) -> None:
        """Launch on the device of the tensor arguments (Triton launches on the current one)."""
        if len(args) != len(self.arg_types):
            raise TypeError(
                f"{self.name}: expected {len(self.arg_types)} arguments, got {len(args)}")
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with device_guard(device):
            self.kernel[grid](*args, **dict(self.constexprs), **dict(self.options()))


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device (a no-op context on CPU, for the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def target_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU (4 per SM); under the interpreter a few, so that the tests
    cross split borders."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def plan_splits(owned: int, swept: int, device: torch.device,
                max_splits: int | None = None) -> tuple[int, int]:
    """``(splits, per_split)``: the ``swept`` blocks in ``splits`` ranges of ``per_split`` so that
    about :func:`target_programs` programs run beside the ``owned`` ones; none of the ranges is
    empty, and there are at most ``max_splits`` (a bound on the partial buffers)."""
    splits = max(1, min(swept, -(-target_programs(device) // max(owned, 1)),
                        max_splits or swept))
    per_split = -(-swept // splits)
    return -(-swept // per_split), per_split


# --------------------------------------------------------------------------------------------
# The merge of split partials.

@triton.jit
def _merge_one(part_ptr, idx, ok, M, splits, SUM: tl.constexpr):
    """Over the ``splits`` partials ``part[s, idx]`` (each ``[splits, M]``): their log-sum-exp,
    or with ``SUM`` their sum."""
    if SUM:
        total = tl.zeros(idx.shape, tl.float32)
        for split in range(0, splits):
            total += tl.load(part_ptr + split * M + idx, mask=ok, other=0.0)
        return total
    m = tl.full(idx.shape, float("-inf"), tl.float32)
    l = tl.zeros(idx.shape, tl.float32)
    for split in range(0, splits):
        x = tl.load(part_ptr + split * M + idx, mask=ok, other=float("-inf"))
        m, l = online_lse_update(m, l, x[None, :], ok[None, :], 0)
    return lse_finalize(m, l)


@triton.jit
def _merge_kernel(part_ptr, terms_ptr, M, splits,
                  COLUMN_WISE: tl.constexpr, BLOCK: tl.constexpr):
    """``part[2, splits, M]`` into ``terms[2, M]``. Row-wise: row 0 the log-sum-exp of the
    partial LSEs (no zero logit, ``-inf`` if all are empty), row 1 the sum of the positive terms.
    Column-wise: ``P_c`` and ``N_c``, the log-sum-exp of each one's partials with the zero logit
    (a softplus), so exactly 0 when empty. The splits are combined in a fixed order
    (deterministic); one launch where torch would take a dozen small ones."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M
    first = _merge_one(part_ptr, idx, ok, M, splits, False)
    second = _merge_one(part_ptr + splits * M, idx, ok, M, splits, not COLUMN_WISE)
    if COLUMN_WISE:
        first = softplus(first)
        second = softplus(second)
    tl.store(terms_ptr + idx, first, mask=ok)
    tl.store(terms_ptr + M + idx, second, mask=ok)


MERGE_BLOCK = 1024
_MERGE_ARGS = (("part_ptr", "*fp32"), ("terms_ptr", "*fp32"), ("M", "i32"), ("splits", "i32"))


def merge_specialisation(column_wise: bool) -> Specialisation:
    """The variant of the merge kernel for a family (fp32 partials whatever the input dtype)."""
    code = int(column_wise)
    return Specialisation(f"{_merge_kernel.__name__}[COLUMN_WISE={code}]", _merge_kernel,
                          _MERGE_ARGS, (("COLUMN_WISE", code), ("BLOCK", MERGE_BLOCK)), 4)


MERGE_SPECIALISATIONS = tuple(merge_specialisation(cw) for cw in (False, True))


def merge_splits(part: torch.Tensor, column_wise: bool) -> torch.Tensor:
    """The ``(2, M)`` fp32 terms from a forward's contiguous ``part[2, splits, M]``."""
    _, splits, m = part.shape
    terms = torch.empty((2, m), device=part.device, dtype=torch.float32)
    merge_specialisation(column_wise).launch((triton.cdiv(m, MERGE_BLOCK),), part, terms, m,
                                             splits)
    return terms
