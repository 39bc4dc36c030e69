"""pytest-benchmark view of the loss providers (not part of CI: ``testpaths`` is ``tests/``).

    python -m pytest benchmarks -q                          # the quick-sop shape
    MPA_BENCH_SHAPES=cub,sop256 python -m pytest benchmarks -q --benchmark-sort=mean
    MPA_BENCH_THREADS=1 python -m pytest benchmarks -q      # on a busy CPU (benchmarks/README.md)
    python -m pytest benchmarks -q -k "mpa_ap and fwd_bwd" --benchmark-compare

The same providers and inputs as ``python -m benchmarks`` (which adds memory, ratios, results files
and charts); a provider that cannot run on the device is skipped with its reason.
"""

import os

import pytest
import torch

from .providers import LOSSES, Case, all_providers, unavailable_reason
from .shapes import SHAPES

DEVICE = torch.device(os.environ.get("MPA_BENCH_DEVICE",
                                     "cuda" if torch.cuda.is_available() else "cpu"))
SHAPE_NAMES = os.environ.get("MPA_BENCH_SHAPES", "quick-sop").split(",")
PROVIDERS = {p.name: p for p in all_providers()}
if "MPA_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["MPA_BENCH_THREADS"]))


def _cases():
    for shape in SHAPE_NAMES:
        for loss in LOSSES:
            for name, p in PROVIDERS.items():
                if p.applies(loss):
                    yield pytest.param(shape, loss, name, id=f"{shape}-{loss}-{name}")


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize(("shape", "loss", "provider"), list(_cases()))
def test_loss_provider(benchmark, shape, loss, provider, mode):
    p = PROVIDERS[provider]
    reason = unavailable_reason(p, DEVICE, interpreter=False)
    if reason is not None:
        pytest.skip(reason)
    case = Case.make(loss, SHAPES[shape], torch.float32, DEVICE)
    run = p.build(case)
    run.reset()
    run.forward_backward()  # warm-up: torch.compile compiles here
    fn = run.forward if mode == "fwd" else run.forward_backward

    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.extra_info.update(n=case.shape.n, c=case.shape.c, k=case.shape.k, d=case.shape.d)
    benchmark.pedantic(call, setup=run.reset, rounds=5, warmup_rounds=1)
    if run.value is not None:
        assert torch.isfinite(torch.tensor(run.value()))
