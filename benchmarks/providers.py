"""Who computes a loss: the reference, ``torch.compile`` of it, pytorch-metric-learning, each of our
backends, and the floor (the GEMMs alone).

A :class:`Case` holds the inputs of one loss at one shape and dtype: embeddings and proxies are leaves
that require grad, so "forward + backward" is ``loss.backward()`` into both. A provider turns a case
into a :class:`Run`: a forward callable, a backward callable that takes the forward's result, and a
``reset`` that drops the gradients, so every forward + backward allocates its gradients afresh
(accumulating into kept gradients would hide that memory).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .shapes import Shape
from mpa_kernels import functional
from mpa_kernels.backends import BACKENDS, _load, triton_interpreting

LOSSES = ("mpa", "mpa_dw", "mpa_ap", "soft_triple", "proxy_anchor", "proxy_nca")
# One per family (column-wise, row-wise) and one that pytorch-metric-learning has: each loss costs
# torch.compile a compilation per shape, which dominates a quick run on a CPU.
QUICK_LOSSES = ("mpa", "mpa_ap", "proxy_anchor")
# ProxyAnchor and ProxyNCA have one proxy per class whatever the shape's K.
SINGLE_PROXY = frozenset({"proxy_anchor", "proxy_nca"})

# The front end's defaults, spelled out because pytorch-metric-learning is given the same values.
HYPERPARAMETERS = {
    "mpa": dict(alpha=32.0, delta=0.1, gamma=0.1, tau=0.2),
    "mpa_dw": dict(alpha=32.0, delta=0.1, gamma=0.1, tau=0.2),
    "mpa_ap": dict(alpha=32.0, delta=0.1, gamma=0.1, tau=0.2),
    "soft_triple": dict(alpha=20.0, delta=0.01, gamma=0.1, tau=0.2),
    "proxy_anchor": dict(alpha=32.0, delta=0.1),
    "proxy_nca": dict(scale=9.0),
}

_FUNCTIONS = {
    "mpa": functional.mpa_loss,
    "mpa_dw": functional.mpa_dw_loss,
    "mpa_ap": functional.mpa_ap_loss,
    "soft_triple": functional.soft_triple_loss,
    "proxy_anchor": functional.proxy_anchor_loss,
    "proxy_nca": functional.proxy_nca_loss,
}

# Bytes per entry of s (N x C*K) assumed for a provider not yet measured at a smaller shape: a naive
# graph keeps s, s / gamma, the softmax, its product with s and their gradients, in fp32.
DEFAULT_BYTES_PER_SCORE = 48


@dataclass
class Case:
    loss: str
    shape: Shape  # with the K the loss uses (1 for the single-proxy losses)
    dtype: torch.dtype
    device: torch.device
    embeddings: torch.Tensor
    labels: torch.Tensor
    proxies: nn.Parameter

    @classmethod
    def make(cls, loss: str, shape: Shape, dtype: torch.dtype, device: torch.device,
             seed: int = 0) -> Case:
        if loss in SINGLE_PROXY:
            shape = shape.with_k(1)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape.n, shape.d, generator=gen).to(device, dtype).requires_grad_()
        w = nn.Parameter(torch.randn(shape.c * shape.k, shape.d, generator=gen).to(device, dtype))
        y = torch.randint(0, shape.c, (shape.n,), generator=gen).to(device)
        return cls(loss, shape, dtype, device, x, y, w)

    def loss_fn(self, backend: str) -> Callable[[], torch.Tensor]:
        kwargs = dict(HYPERPARAMETERS[self.loss])
        if self.loss not in SINGLE_PROXY:
            kwargs["proxies_per_class"] = self.shape.k
        # validate=False: the value checks are the front end's, the same for every backend, and
        # on CUDA they synchronise; the benchmark measures the loss computation.
        return functools.partial(_FUNCTIONS[self.loss], backend=backend, validate=False, **kwargs)


@dataclass
class Run:
    forward: Callable[[], object]
    backward: Callable[[object], object]  # takes what forward returned
    reset: Callable[[], None]
    value: Callable[[], float] | None = None  # the loss, to check that providers agree

    def forward_backward(self) -> None:
        self.backward(self.forward())


def _loss_run(case: Case, fn: Callable, leaves: list[torch.Tensor]) -> Run:
    def call():
        return fn(case.embeddings, case.labels, case.proxies)

    def reset():
        for t in leaves:
            t.grad = None

    return Run(call, torch.Tensor.backward, reset, lambda: float(call().detach()))


@dataclass
class Provider:
    """``build(case)`` makes the run; ``extra_bytes(case)`` is memory it needs beyond what scales
    with the size of s (used only by the estimate that guards the CPU against the OOM killer)."""

    name: str
    build: Callable[[Case], Run]
    applies: Callable[[str], bool] = lambda loss: True
    extra_bytes: Callable[[Case], int] = lambda case: 0
    compiles: bool = False
    per_shape_only: bool = False  # the same for every loss: measured once per shape and dtype


def _backend_provider(name: str) -> Provider:
    def build(case: Case) -> Run:
        return _loss_run(case, case.loss_fn(name), [case.embeddings, case.proxies])

    return Provider(name, build)


def _compile_build(case: Case) -> Run:
    # A fresh dynamo state per case: otherwise the second shape recompiles with dynamic shapes
    # ("automatic dynamic"), and what is measured would depend on the order of the sweep.
    torch._dynamo.reset()
    fn = torch.compile(case.loss_fn("reference"), dynamic=False)
    return _loss_run(case, fn, [case.embeddings, case.proxies])


def _pml_build(case: Case) -> Run:
    from pytorch_metric_learning import losses, regularizers

    hp, s = HYPERPARAMETERS[case.loss], case.shape
    if case.loss == "proxy_anchor":
        module = losses.ProxyAnchorLoss(s.c, s.d, margin=hp["delta"], alpha=hp["alpha"])
        module.proxies = case.proxies
    elif case.loss == "proxy_nca":
        module = losses.ProxyNCALoss(s.c, s.d, softmax_scale=hp["scale"])
        module.proxies = case.proxies
    else:  # soft_triple; pml keeps the centres as columns, row c*K + k of ours is column c*K + k
        module = losses.SoftTripleLoss(
            s.c, s.d, centers_per_class=s.k, la=hp["alpha"], gamma=hp["gamma"],
            margin=hp["delta"],
            weight_regularizer=regularizers.SparseCentersRegularizer(s.c, s.k),
            weight_reg_weight=hp["tau"],
        )
        module.fc = nn.Parameter(case.proxies.detach().t())
    module.to(case.device)
    leaves = [case.embeddings, *module.parameters()]
    return _loss_run(case, lambda x, y, w: module(x, y), leaves)


def _pml_extra_bytes(case: Case) -> int:
    # pml's SoftTriple regulariser builds the full (C*K)^2 centre-similarity matrix and a boolean
    # mask of that size; its other losses scale with s.
    ck = case.shape.c * case.shape.k
    return 10 * ck * ck if case.loss == "soft_triple" else 0


def _floor_build(case: Case, preallocated: bool = False) -> Run:
    """The GEMMs every loss over s = x_hat w_hat^T needs, at the inputs' precision: x w^T forward,
    ds w and ds^T x backward. ds is an input, as x and w are: the floor is what remains when
    everything between the GEMMs costs nothing. Its outputs are fresh tensors, as autograd's
    would be, and their first writes fault their pages in; preallocated: they are allocated once,
    beforehand, and only the GEMMs are timed."""
    x, w = case.embeddings.detach(), case.proxies.detach()
    ds = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    if not preallocated:
        return Run(lambda: x @ w.T, lambda _s: (ds @ w, ds.T @ x), lambda: None)
    s, dx, dw = x @ w.T, ds @ w, ds.T @ x

    def backward(_s):
        return torch.mm(ds, w, out=dx), torch.mm(ds.T, x, out=dw)

    return Run(lambda: torch.mm(x, w.T, out=s), backward, lambda: None)


def _pml_applies(loss: str) -> bool:
    return loss in ("proxy_anchor", "proxy_nca", "soft_triple")


def all_providers() -> list[Provider]:
    """Every provider this installation has; our backends are discovered from the registry, so a
    backend added to :mod:`mpa_kernels.backends` appears here without an edit."""
    ours = [_backend_provider(b) for b in BACKENDS
            if b not in ("auto", "reference") and _load(b) is not None]
    return [
        _backend_provider("reference"),
        Provider("compile", _compile_build, compiles=True),
        Provider("pml", _pml_build, applies=_pml_applies, extra_bytes=_pml_extra_bytes),
        *ours,
        Provider("floor", _floor_build, per_shape_only=True),
    ]


def unavailable_reason(provider: Provider, device: torch.device, interpreter: bool) -> str | None:
    """Why ``provider`` cannot (or, for the Triton interpreter, should not) run on ``device``."""
    if provider.name in BACKENDS:
        reason = _load(provider.name).unavailable_reason(device)
        if reason is None and device.type == "cpu" and provider.name.startswith("triton") \
                and triton_interpreting() and not interpreter:
            return ("runs through the Triton interpreter on CPU, which measures the interpreter, "
                    "not the kernel (pass --interpreter to include it)")
        return reason
    if provider.name == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return "pytorch-metric-learning is not installed"
    return None
