"""Without a GPU: every kernel specialisation the library can launch compiles for sm_80
and sm_90 without a GPU, fp32, fp16 and bf16, and none of them spills registers to local memory.

The compile runs in a subprocess because conftest.py sets ``TRITON_INTERPRET=1`` for this process,
and under it ``@triton.jit`` returns interpreter objects. The launchers and the compile check share
one registry (``SPECIALISATIONS``, built by ``similarity.specialisation``); the second test checks
that what the launchers actually launch is in it, with the argument types it declares.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpa_kernels.functional as F
from mpa_kernels.kernels import compile_check, launch, linear, similarity

ROOT = Path(__file__).resolve().parents[1]
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int64: "i64"}


@pytest.mark.slow
@pytest.mark.parametrize("module", [similarity, linear], ids=["similarity", "linear"])
def test_every_specialisation_compiles_for_sm80_and_sm90_without_spills(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    resources = compile_check.cuobjdump() is not None
    result = subprocess.run([sys.executable, "-m", "mpa_kernels.kernels.compile_check",
                             "--module", module.__name__] + ["--resources"] * resources,
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]
    expected = 2 * len(module.SPECIALISATIONS)
    assert f"compiled {expected}/{expected}" in result.stdout
    if not resources:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend ships one): register use not read")
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| _")]
    assert len(rows) == expected
    header = [h.strip() for h in compile_check.markdown_table([]).splitlines()[0].split("|")[1:-1]]
    spilling = [row for row in rows if int(row[header.index("stack (B)")]) != 0]
    assert not spilling, spilling
    assert "0 resource problems" in result.stdout


_CUOBJDUMP = """
Resource usage:
 Common:
  GLOBAL:0
 Function _backward_kernel:
  REG:255 STACK:992 SHARED:1024 LOCAL:0 CONSTANT[0]:672 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_parse_and_occupancy():
    assert compile_check.parse_resource_usage(_CUOBJDUMP) == [(255, 992, 1024)]
    # 168 registers: 5376 per warp after rounding to 256, 12 warps, one block of 8.
    assert compile_check.Resources(168, 0, 13312).blocks_per_sm(90, 8) == (1, "registers")
    # 64 registers, 4 warps: 8 blocks by registers; 40 KiB + 1 KiB reserve: 4 on sm_80, 5 on sm_90.
    assert compile_check.Resources(64, 0, 40 * 1024).blocks_per_sm(80, 4) == (4, "shared")
    assert compile_check.Resources(64, 0, 40 * 1024).blocks_per_sm(90, 4) == (5, "shared")
    assert compile_check.Resources(32, 0, 0).blocks_per_sm(90, 4) == (16, "warps")


def record_launches(monkeypatch) -> list:
    """Names of the specialisations launched from now on; each launch's arguments are checked
    against the types the specialisation declares (what the compile check compiled)."""
    launched = []
    real_launch = launch.Specialisation.launch

    def recording_launch(self, grid, *args):
        launched.append(self.name)
        assert tuple(_triton_type(a) for a in args) == tuple(t for _, t in self.arg_types)
        return real_launch(self, grid, *args)

    monkeypatch.setattr(launch.Specialisation, "launch", recording_launch)
    return launched


def _triton_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"unexpected kernel argument {value!r}")
    return "i32" if isinstance(value, int) else "fp32"


@pytest.mark.parametrize("loss,k,dtype", [("mpa", 3, torch.float32), ("mpa_dw", 10, torch.float16),
                                          ("soft_triple", 1, torch.float32),
                                          ("mpa_ap", 2, torch.float16)])
def test_launched_specialisations_are_the_checked_ones(monkeypatch, loss, k, dtype):
    launched = record_launches(monkeypatch)
    fn = {"mpa": F.mpa_loss, "mpa_dw": F.mpa_dw_loss, "mpa_ap": F.mpa_ap_loss,
          "soft_triple": F.soft_triple_loss}[loss]
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(3 * k, 8, dtype=dtype, requires_grad=True)
    fn(x, torch.tensor([0, 1, 2, 1, 0]), w, proxies_per_class=k, backend="triton").backward()
    assert len(launched) == 3  # forward, merge, backward
    assert set(launched) <= {spec.name for spec in similarity.SPECIALISATIONS}
