"""Process-group set-up for torchrun, and the two gathers the harness needs.

Why the loss sees every rank's embeddings: proxy losses are not sums over samples (MPA's positive
term is a log-sum-exp per class over the batch), so the paper's loss on a global batch of B is not
the mean of W losses on B/W. Each rank gathers all embeddings *with their gradient*, computes the
same loss on the same global batch, and backpropagates. The gather's backward sums the incoming
gradients over ranks, so rank r's embeddings receive W * dL/dx_r (every rank contributes the
identical dL/dx_r). DDP then averages parameter gradients over the W ranks:
(1/W) * sum_r W * (dL/dx_r)(dx_r/dtheta) = dL/dtheta, exactly the gradient of one process on the
whole batch. The proxies live in the DDP-wrapped module too; their gradient is
the same on every rank and averaging keeps them in sync.

With ``class_parallel`` the proxies are sharded by class (``mpa_kernels.parallel``): only the
network is wrapped in DDP, the loss gathers the batch itself, and its gather's backward returns
rank r ``W * dL/dx_r`` (the sum over ranks of each rank's share of the gradient, times W), so that
DDP's average is again dL/dtheta. Each rank's proxies get their exact gradient, unaveraged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str) -> Context:
    """Join the process group that torchrun describes (WORLD_SIZE > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return Context(rank, world, dev)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and keeps this rank's slice.

    The sum is an all-reduce of the whole (B, d) gradient rather than a reduce-scatter, which gloo
    lacks; embeddings are small next to the network, so the extra traffic does not matter.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.world_size = rank, world_size
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(ctx.world_size, dim=0)[ctx.rank], None, None


def gather_with_grad(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """All ranks' ``x`` (same shape on every rank) in rank order, differentiable: rank r's slice
    receives the sum over ranks of the gradient with respect to it (see the module docstring)."""
    if not ctx.distributed:
        return x
    return _GatherWithGrad.apply(x, ctx.rank, ctx.world_size)


def gather(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """All ranks' ``x`` (first dimensions may differ by rank) concatenated in rank order."""
    if not ctx.distributed:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)], dim=0)


class _ClassParallelStep(torch.nn.Module):
    """The training forward of a class-parallel run: DDP(network), then the sharded loss."""

    def __init__(self, net: torch.nn.Module, criterion: torch.nn.Module):
        super().__init__()
        self.net, self.criterion = net, criterion

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.net(x), labels)


def class_parallel_model(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """``model`` (with ``.net`` and a class-parallel ``.criterion``) for training: the network in
    DDP, the proxies outside it (they are not replicated, so nothing of theirs is all-reduced)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return _ClassParallelStep(DistributedDataParallel(model.net, device_ids=ids), model.criterion)


def gather_objects(obj, ctx: Context) -> list:
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
