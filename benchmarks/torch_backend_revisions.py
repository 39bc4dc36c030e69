"""The ``"torch"`` backend of this checkout against the same backend at another git revision, side by
side in one process, one thread: forward + backward medians and their ratio, per loss and shape.

    python -m benchmarks.torch_backend_revisions --against eceb071 --out benchmarks/results

``--against eager`` compares this checkout's backend with itself with its native loops switched
off (the eager ops that run where they cannot be built).

The other revision's ``mpa_kernels/backends/torch_chunked.py`` is loaded as a stand-alone module
(its entry point ``proxy_loss(x_hat, proxies, labels, spec, tau)`` has kept its signature), so
both run against this checkout's front end, spec and normalisation; where the revision has native
loops, its own ``torch_native.cpp`` is built for it (once, about half a minute, under a name of
its own), so that a change to the loops is compared too. The calls alternate, so load
on a shared machine affects both alike. Medians and minima are both reported: where a call is tens
of milliseconds, whether the allocator hands back memory already touched or fresh pages (each a
page fault; the proxies' gradient is a fresh tensor every call) can move a median by 20 % either
way, and the minimum, over the calls that got touched memory, is the steadier comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mpa_kernels._spec import LossSpec
from mpa_kernels.backends import _native, torch_chunked
from mpa_kernels.functional import unit_rows

from .shapes import SHAPES

LOSSES = ("mpa", "mpa_dw", "mpa_ap", "soft_triple", "proxy_anchor", "proxy_nca")


def _show(rev: str, path: str) -> str | None:
    """The file at that revision, or None where it did not exist."""
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


class _NativeAt:
    """The ``_native`` that a revision's backend calls: that revision's native loops, built under a
    name of their own, or None (its eager ops) where they cannot be built."""

    def __init__(self, source: str, folder: Path) -> None:
        path = folder / "torch_native.cpp"
        path.write_text(source)
        tag = "_" + hashlib.sha1(source.encode()).hexdigest()[:10]
        try:
            self._module = _native.build(path, tag)
        except Exception as error:  # no compiler, a failed build: as the revision would run
            print(f"the revision's native loops could not be built ({error}); it runs eager")
            self._module = None

    def module(self):
        return self._module


def _module_at(rev: str):
    """The revision's torch_chunked.py as a stand-alone module, with its own native loops: an
    import of this checkout's would compare the same loops twice, or call them with the
    revision's arguments."""
    folder = Path(tempfile.mkdtemp())
    path = folder / "torch_chunked_at_rev.py"
    path.write_text(_show(rev, "mpa_kernels/backends/torch_chunked.py"))
    spec = importlib.util.spec_from_file_location("torch_chunked_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    native = _show(rev, "mpa_kernels/backends/torch_native.cpp")
    if (native is not None and hasattr(module, "_native")
            and native != _native._SOURCE.read_text()):
        module._native = _NativeAt(native, folder)  # read at call time, by _native_ops
    return module


class _Eager:
    """This checkout's backend with its native loops off. The mean's gradients are formed in its
    forward, so the switch need only hold during the call."""

    @staticmethod
    def proxy_loss(*args):
        torch_chunked.NATIVE = False
        try:
            return torch_chunked.proxy_loss(*args)
        finally:
            torch_chunked.NATIVE = True


def _time(module, x, w, y, spec, tau) -> float:
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    start = time.perf_counter()
    module.proxy_loss(unit_rows(xx), ww, y, spec, tau).backward()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True,
                        help="git revision to compare with, or 'eager': this one's eager ops")
    parser.add_argument("--shapes", default="cub,sop32,sop256,cpu-target")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default="benchmark-results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = _Eager if args.against == "eager" else _module_at(args.against)
    shapes = SHAPES
    rows = []
    for shape_name in args.shapes.split(","):
        shape = shapes[shape_name]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape.n, shape.d, generator=gen)
        y = torch.randint(0, shape.c, (shape.n,), generator=gen)
        for loss in args.losses.split(","):
            k = 1 if loss in ("proxy_anchor", "proxy_nca") else shape.k
            w = torch.randn(shape.c * k, shape.d, generator=gen)
            spec = LossSpec(loss, shape.c, k, 18.0 if loss == "proxy_nca" else 32.0,
                            0.0 if loss == "proxy_nca" else 0.1)
            tau = 0.2 if k > 1 else 0.0
            times = {"before": [], "after": []}
            for _ in range(args.repeats + 1):  # the first round warms up
                for tag, module in (("before", old), ("after", torch_chunked)):
                    times[tag].append(_time(module, x, w, y, spec, tau))
            before, after = (statistics.median(times[t][1:]) for t in ("before", "after"))
            least_before, least_after = (min(times[t][1:]) for t in ("before", "after"))
            row = dict(loss=loss, shape=shape_name, before_s=before, after_s=after,
                       ratio=after / before, before_min_s=least_before,
                       after_min_s=least_after, min_ratio=least_after / least_before)
            rows.append(row)
            print(f"{loss:12s} {shape_name:10s} {args.against}: {before * 1e3:8.1f} ms   this "
                  f"checkout: {after * 1e3:8.1f} ms   ratio {after / before:.2f}   of the "
                  f"minima {least_after / least_before:.2f}", flush=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    # A checkout with changes not committed is not HEAD: say so in the name and the file.
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                      capture_output=True, text=True).stdout.strip():
        head += "-dirty"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"torch-backend-{head}-vs-{args.against}.json"
    path.write_text(json.dumps(dict(against=args.against, head=head, threads=1,
                                    repeats=args.repeats, load_average=os.getloadavg(),
                                    rows=rows), indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
