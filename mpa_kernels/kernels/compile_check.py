"""Compile every kernel specialisation the library can launch, for sm_80 and sm_90, without a GPU.

The third rung of the verification ladder (after the reference and the interpreter): Triton compiles for a CUDA target with no GPU present, which catches
what the interpreter forgives (dtype rules, layouts, register and shared-memory limits reported by
ptxas). Run it as::

    python -m mpa_kernels.kernels.compile_check [--module NAME ...] [--arch 80 90] [--jobs N]
                                                [--list] [--resources [--table PATH]]

Without ``--module`` it checks every module in :data:`MODULES`; the tests check one module each so
that each stays within its own time budget. It exits 0 when everything compiles and 1 with one
message per failure otherwise.

``--resources`` also reads each cubin's resource use with ``cuobjdump --dump-resource-usage`` (the
one Triton ships beside ``ptxas``): registers per thread, local-memory stack per thread (a spill:
any non-zero stack fails the check), shared memory per block (Triton's dynamic shared memory plus
the static part) and the occupancy those allow on the architecture (:data:`SM_LIMITS`). It prints
one row per variant and architecture; ``--table PATH`` writes the rows as a Markdown table.

Each module named in :data:`MODULES` defines ``SPECIALISATIONS``: the variants its launchers can
produce, built by the same function the launchers call (so the list cannot drift from what runs).
An entry has ``name``, ``kernel`` (the ``@triton.jit`` function), ``signature()`` (Triton's dict:
runtime argument types, ``"constexpr"`` for constexprs), ``constexprs`` (``(name, value)`` pairs)
and ``num_warps``; see :class:`mpa_kernels.kernels.launch.Specialisation`. A new kernel module
joins the check by adding its name to :data:`MODULES`.

``TRITON_INTERPRET`` must be unset (with it ``@triton.jit`` returns interpreter objects that cannot
be compiled); the module re-executes itself without it when it finds it set, so the test suite,
which sets it for the interpreter tests, can call it as is.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

MODULES = ("mpa_kernels.kernels.similarity", "mpa_kernels.kernels.linear")
ARCHS = (80, 90)


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one architecture (CUDA C Programming Guide, "Compute Capabilities")."""

    registers: int = 65536  # 32-bit registers per SM
    max_warps: int = 64
    max_blocks: int = 32
    shared: int = 0  # bytes of shared memory per SM available to blocks
    shared_per_block: int = 0  # the most one block may opt in to
    reserved_shared: int = 1024  # the runtime keeps 1 KiB per resident block


SM_LIMITS = {80: SMLimits(shared=164 * 1024, shared_per_block=163 * 1024),
             90: SMLimits(shared=228 * 1024, shared_per_block=227 * 1024)}


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel uses, per thread (registers, stack) and per block (shared)."""

    registers: int
    stack: int
    shared: int

    def blocks_per_sm(self, arch: int, num_warps: int) -> tuple[int, str]:
        """Resident blocks per SM and the resource that bounds them (registers are allocated per
        warp in units of 256, shared memory per block plus the runtime's reserve)."""
        lim = SM_LIMITS[arch]
        per_warp = -(-self.registers * 32 // 256) * 256
        bounds = {"warps": lim.max_warps // num_warps, "blocks": lim.max_blocks,
                  "registers": (lim.registers // per_warp) // num_warps,
                  "shared": lim.shared // (self.shared + lim.reserved_shared)}
        limiter = min(bounds, key=bounds.get)
        return bounds[limiter], limiter


_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)")


def parse_resource_usage(text: str) -> list[tuple[int, int, int]]:
    """``(registers, stack bytes, static shared bytes)`` of every function in ``cuobjdump
    --dump-resource-usage`` output, in order."""
    return [tuple(map(int, m.groups())) for m in _RESOURCE_LINE.finditer(text)]


def cuobjdump() -> str | None:
    """The ``cuobjdump`` Triton ships (or one on PATH), None when there is none."""
    try:
        from triton.backends.nvidia import __file__ as nvidia
        shipped = os.path.join(os.path.dirname(nvidia), "bin", "cuobjdump")
        if os.access(shipped, os.X_OK):
            return shipped
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _resources(compiled) -> Resources:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    rows = parse_resource_usage(out)
    if len(rows) != 1:
        raise RuntimeError(f"expected one kernel in the cubin, cuobjdump says:\n{out}")
    registers, stack, static_shared = rows[0]
    return Resources(registers, stack, compiled.metadata.shared + static_shared)


def _specialisations(module_name: str):
    return importlib.import_module(module_name).SPECIALISATIONS


def _source(spec):
    from triton.compiler import ASTSource

    # Positional: the third parameter is `constants` in Triton <= 3.2 and `constexprs` after; both
    # accept names as keys.
    return ASTSource(spec.kernel, spec.signature(), dict(spec.constexprs))


def _compile_one(job: tuple[str, int, int, bool]):
    """Compile entry ``index`` of ``module_name`` for ``sm_<arch>``: ``(job, seconds, error or
    None, Resources or None)``."""
    import triton
    from triton.backends.compiler import GPUTarget

    module_name, index, arch, resources = job
    spec = _specialisations(module_name)[index]
    start = time.perf_counter()
    try:
        compiled = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                                  options=dict(spec.options()))
        used = _resources(compiled) if resources else None
    except Exception:  # report every failure, not just the first
        return job, time.perf_counter() - start, traceback.format_exc(limit=3), None
    return job, time.perf_counter() - start, None, used


_HEADER = ("variant", "arch", "warps", "stages", "registers", "stack (B)", "shared (B)",
           "blocks/SM", "warps/SM", "bound by")


def _row(spec, arch: int, used: Resources) -> tuple:
    blocks, limiter = used.blocks_per_sm(arch, spec.num_warps)
    return (spec.name, f"sm_{arch}", spec.num_warps, spec.num_stages, used.registers, used.stack,
            used.shared, blocks, blocks * spec.num_warps, limiter)


def _problems(spec, arch: int, used: Resources) -> list[str]:
    out = []
    if used.stack:
        out.append(f"{spec.name} for sm_{arch} spills: {used.stack} bytes of stack per thread "
                   f"at {used.registers} registers")
    if used.shared > SM_LIMITS[arch].shared_per_block:
        out.append(f"{spec.name} for sm_{arch} needs {used.shared} bytes of shared memory, "
                   f"more than a block may have ({SM_LIMITS[arch].shared_per_block})")
    return out


def _provenance() -> str:
    import triton

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True,
                                  cwd=os.path.dirname(__file__)).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " with uncommitted changes" if git("status", "--porcelain", "--", "mpa_kernels") else ""
    return f"Triton {triton.__version__}, mpa-kernels commit {commit}{dirty}"


def markdown_table(rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", nargs="+", default=list(MODULES), choices=MODULES,
                        help="kernel modules to check (default: all)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help="CUDA compute capabilities, as 80 for sm_80 (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiler processes (default: all cores)")
    parser.add_argument("--list", action="store_true", help="list the specialisations and exit")
    parser.add_argument("--resources", action="store_true",
                        help="report registers, stack, shared memory and occupancy; fail on "
                             "any spill")
    parser.add_argument("--table", metavar="PATH",
                        help="with --resources: write the rows as a Markdown table to PATH")
    args = parser.parse_args(argv)
    if args.resources and cuobjdump() is None:
        parser.error("--resources needs cuobjdump (Triton's NVIDIA backend ships one)")

    jobs, names = [], []
    for module_name in args.module:
        for index, spec in enumerate(_specialisations(module_name)):
            names.append(spec.name)
            jobs.extend((module_name, index, arch, args.resources) for arch in args.arch)
    if args.list:
        print("\n".join(names))
        return 0

    start = time.perf_counter()
    failures, problems, rows = [], [], []
    # fork: the workers inherit the imported kernels; each compile is independent.
    import multiprocessing

    with ProcessPoolExecutor(max_workers=max(1, args.jobs),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        for (module_name, index, arch, _), _, error, used in pool.map(_compile_one, jobs,
                                                                       chunksize=4):
            spec = _specialisations(module_name)[index]
            if error is not None:
                failures.append(f"{spec.name} for sm_{arch}:\n{error}")
            elif used is not None:
                rows.append(_row(spec, arch, used))
                problems += _problems(spec, arch, used)
    elapsed = time.perf_counter() - start
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    if args.resources:
        print(markdown_table(rows), end="")
        if args.table:
            with open(args.table, "w") as f:
                f.write(f"# Kernel resources, {', '.join(f'sm_{a}' for a in args.arch)}\n\n"
                        f"{_provenance()}. Written by `python -m mpa_kernels.kernels."
                        f"compile_check --resources --table` (per thread: registers, stack; per "
                        f"block: shared memory; per SM: the blocks and warps those allow, and "
                        f"the resource that bounds them).\n\n{markdown_table(rows)}")
        for problem in problems:
            print(f"RESOURCES {problem}", file=sys.stderr)
        print(f"{len(problems)} resource problems (spills or shared memory) in {len(rows)} "
              f"compiled kernels")
    print(f"compiled {len(jobs) - len(failures)}/{len(jobs)} ({len(names)} specialisations x "
          f"sm_{', sm_'.join(map(str, args.arch))}) in {elapsed:.1f} s")
    return 1 if failures or problems else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "mpa_kernels.kernels.compile_check",
                                   *sys.argv[1:]], env)
    sys.exit(main())
