"""Problem sizes of the benchmark protocol (CUB-, SOP- and face-scale, d = 512) and the small ones of
``--quick``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """``n`` samples of dimension ``d`` against ``c`` classes of ``k`` proxies each."""

    name: str
    n: int
    c: int
    k: int
    d: int = 512

    def with_k(self, k: int) -> Shape:
        return Shape(self.name, self.n, self.c, k, self.d)

    @property
    def scores(self) -> int:
        """Entries of the similarity tensor ``s`` (N x C*K): what a naive implementation stores."""
        return self.n * self.c * self.k


SHAPES = {
    s.name: s
    for s in (
        Shape("cub", 180, 100, 10),
        Shape("sop32", 32, 11318, 2),
        Shape("sop256", 256, 11318, 2),
        # The CPU backend's target: a CUB-sized batch against SOP's classes with CUB's K.
        Shape("cpu-target", 180, 11318, 10),
        Shape("large", 1024, 100000, 4),
        # --quick: the same regimes (few classes, many classes) at a size a 2-core CPU runs in
        # seconds, including the compile of every loss.
        Shape("tiny", 16, 10, 2, 32),
        Shape("quick-cub", 180, 100, 10, 128),
        Shape("quick-sop", 64, 2000, 2, 128),
    )
}

FULL = ("cub", "sop32", "sop256", "cpu-target", "large")
QUICK = ("quick-cub", "quick-sop")
