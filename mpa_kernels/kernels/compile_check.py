"""Compile every kernel specialisation the library can launch, for sm_80 and sm_90, without a GPU.

Ladder step 3 of GUIDE.md: Triton compiles for a CUDA target with no GPU present, which catches
what the interpreter forgives (dtype rules, layouts, register and shared-memory limits reported by
ptxas). Run it as::

    python -m mpa_kernels.kernels.compile_check [--module NAME ...] [--arch 80 90] [--jobs N]
                                                [--list]

Without ``--module`` it checks every module in :data:`MODULES`; the tests check one module each so
that each stays within its own time budget. It exits 0 when everything compiles and 1 with one
message per failure otherwise.

Each module named in :data:`MODULES` defines ``SPECIALISATIONS``: the variants its launchers can
produce, built by the same function the launchers call (so the list cannot drift from what runs).
An entry has ``name``, ``kernel`` (the ``@triton.jit`` function), ``signature()`` (Triton's dict:
runtime argument types, ``"constexpr"`` for constexprs), ``constexprs`` (``(name, value)`` pairs)
and ``num_warps``; see :class:`mpa_kernels.kernels.similarity.Specialisation`. A new kernel module
joins the check by adding its name to :data:`MODULES`.

``TRITON_INTERPRET`` must be unset (with it ``@triton.jit`` returns interpreter objects that cannot
be compiled); the module re-executes itself without it when it finds it set, so the test suite,
which sets it for the interpreter tests, can call it as is.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

MODULES = ("mpa_kernels.kernels.similarity", "mpa_kernels.kernels.linear")
ARCHS = (80, 90)


def _specialisations(module_name: str):
    return importlib.import_module(module_name).SPECIALISATIONS


def _source(spec):
    from triton.compiler import ASTSource

    # Positional: the third parameter is `constants` in Triton <= 3.2 and `constexprs` after; both
    # accept names as keys.
    return ASTSource(spec.kernel, spec.signature(), dict(spec.constexprs))


def _compile_one(job: tuple[str, int, int]) -> tuple[str, int, float, str | None]:
    """Compile entry ``index`` of ``module_name`` for ``sm_<arch>``: ``(name, arch, seconds,
    error or None)``."""
    import triton
    from triton.backends.compiler import GPUTarget

    module_name, index, arch = job
    spec = _specialisations(module_name)[index]
    start = time.perf_counter()
    try:
        triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": spec.num_warps})
    except Exception:  # report every failure, not just the first
        return spec.name, arch, time.perf_counter() - start, traceback.format_exc(limit=3)
    return spec.name, arch, time.perf_counter() - start, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", nargs="+", default=list(MODULES), choices=MODULES,
                        help="kernel modules to check (default: all)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help="CUDA compute capabilities, as 80 for sm_80 (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiler processes (default: all cores)")
    parser.add_argument("--list", action="store_true", help="list the specialisations and exit")
    args = parser.parse_args(argv)

    jobs, names = [], []
    for module_name in args.module:
        for index, spec in enumerate(_specialisations(module_name)):
            names.append(spec.name)
            jobs.extend((module_name, index, arch) for arch in args.arch)
    if args.list:
        print("\n".join(names))
        return 0

    start = time.perf_counter()
    failures = []
    # fork: the workers inherit the imported kernels; each compile is independent.
    import multiprocessing

    with ProcessPoolExecutor(max_workers=max(1, args.jobs),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        for name, arch, _, error in pool.map(_compile_one, jobs, chunksize=4):
            if error is not None:
                failures.append(f"{name} for sm_{arch}:\n{error}")
    elapsed = time.perf_counter() - start
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"compiled {len(jobs) - len(failures)}/{len(jobs)} ({len(names)} specialisations x "
          f"sm_{', sm_'.join(map(str, args.arch))}) in {elapsed:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "mpa_kernels.kernels.compile_check",
                                   *sys.argv[1:]], env)
    sys.exit(main())
