"""Class-parallel proxies: one loss over many classes, its proxies sharded by class across ranks.

Rank ``r`` of a process group of ``R`` ranks owns the contiguous class range
``[c_r, c_{r+1})`` with ``c_r = r * C // R`` (shards differ by at most one class when ``R`` does not
divide ``C``) and holds only those proxies, ``(c_{r+1} - c_r) * K`` rows, and so only their
optimiser state. Each rank passes its *local* embeddings and their *global* labels; the loss returned is the
same scalar on every rank and equals the single-process loss on the gathered batch.

One step, per rank:

1. :func:`gather_embeddings` all-gathers the embeddings (``N_r x d`` each, ``N`` in all; ranks
   may hold different ``N_r``; in the dtype of embeddings and proxies promoted) and the labels;
   each rank then normalises the gathered batch. Its backward sums the gradient over ranks and
   returns each rank its own rows (a reduce-scatter on NCCL; an all-reduce and a slice on gloo,
   which has no reduce-scatter).
2. The backend computes this rank's unreduced terms over its own classes, the ``proxy_terms`` or
   ``similarity_terms`` of the backend contract (:mod:`mpa_kernels.backends`) with the spec of
   the shard (:meth:`~mpa_kernels._spec.LossSpec.shard_of`); labels of other ranks' classes fall
   outside the shard and make every local class a negative of their row.
3. :func:`merge_terms` turns the terms of every rank into the loss:

   * row-wise losses (MPA-DW, MPA-AP, SoftTriple, ProxyNCA): per sample, the partial
     log-sum-exps are merged by :class:`_MergeLogSumExp`, an all-reduce MAX of the row maxima and a
     SUM of the rescaled sums (``2 N`` numbers, whatever ``C`` is); the positive term, non-zero only
     on the rank that owns the label, and the regulariser's partial sum go through one SUM
     all-reduce of ``N + 1`` numbers. The implicit zero logit is added once, after the merge
     (:func:`mpa_kernels.functional.row_losses`).
   * column-wise losses (MPA, ProxyAnchor): every class's log-sum-exps run over the gathered batch,
     so they are local; ``|C+|`` is counted from the gathered labels and ``C`` is global; one SUM
     all-reduce of a single scalar adds the ranks' partial sums.

   These are PartialFC's (insightface) and Megatron's vocabulary-parallel cross-entropy's three
   all-reduces, generalised to the two families of proxy losses.

Gradients. Every rank holds the same loss ``L`` and back-propagates ``dL/dL = 1``. An all-reduce SUM
``y = sum_r x_r`` therefore has the backward ``dL/dx_r = dL/dy`` on each rank with no communication
(:class:`_AllReduceSum`), and the merged log-sum-exp has the local backward
``dL/dlse_i^r = exp(lse_i^r - LSE_i) dL/dLSE_i``. Proxy gradients are then exact and local. The
embedding gradient of rank ``r`` after step 1 is the true ``dL/dx_r`` (each rank contributes the
part that flows through its own classes, and the gather's backward sums them).

Data-parallel backbones. DDP *averages* parameter gradients over the ``R`` ranks, so a backbone fed
the true ``dL/dx_r`` would step with ``dL/dtheta / R``. With ``ddp_average=True`` (the default) the
gather's backward multiplies the embedding gradient by ``R``, so that DDP's average gives exactly
the single-process ``dL/dtheta``; the proxies are outside DDP and get the unscaled, exact gradient. Pass
``ddp_average=False`` when the backbone's gradients are summed, or not reduced, across the group.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mpa_kernels import losses as _losses
from mpa_kernels._checks import all_finite
from mpa_kernels._spec import (
    LOSSES,
    LossSpec,
    check_int,
    check_loss_hyperparameters,
    check_number,
)
from mpa_kernels.backends import BackendUnavailableError, check_backend_name, resolve
from mpa_kernels.functional import (
    _HALF,
    first_order_guard,
    row_losses,
    unit_proxy_regularizer,
    unit_rows,
)

__all__ = [
    "ClassParallelLoss",
    "CommCounter",
    "class_ranges",
    "gather_embeddings",
    "merge_full_state_dicts",
    "merge_terms",
]

LOSS_CLASSES = {
    "mpa": _losses.MPALoss,
    "mpa_dw": _losses.MPADWLoss,
    "mpa_ap": _losses.MPAAPLoss,
    "soft_triple": _losses.SoftTripleLoss,
    "proxy_anchor": _losses.ProxyAnchorLoss,
    "proxy_nca": _losses.ProxyNCALoss,
}


def class_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """The class range ``[c_r, c_{r+1})`` of every rank, ``c_r = r * C // R``."""
    check_int("num_classes", num_classes, 1)
    check_int("world_size", world_size, 1)
    if world_size > num_classes:
        raise ValueError(f"{world_size} ranks cannot share {num_classes} classes: every rank must "
                         "own at least one class")
    bounds = [r * num_classes // world_size for r in range(world_size + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# -- communication ------------------------------------------------------------------------------

class CommCounter:
    """Counts the payload bytes this process hands to collectives (what it sends into each one).

    ``with CommCounter() as c: ...`` then ``c.bytes`` and ``c.calls`` (a dict per collective kind).
    Used by the benchmark to show that the traffic of a step does not depend on ``C``.
    """

    active: "CommCounter | None" = None

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __enter__(self) -> "CommCounter":
        CommCounter.active = self
        return self

    def __exit__(self, *exc) -> None:
        CommCounter.active = None

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    @staticmethod
    def record(kind: str, t: torch.Tensor) -> None:
        c = CommCounter.active
        if c is not None:
            c.bytes[kind] = c.bytes.get(kind, 0) + t.numel() * t.element_size()
            c.calls[kind] = c.calls.get(kind, 0) + 1


@dataclass(frozen=True)
class _Group:
    """A process group with this process's rank in it; ``group=None`` outside torch.distributed."""

    group: object
    rank: int
    size: int

    @staticmethod
    def of(process_group) -> "_Group":
        if process_group is None and not (dist.is_available() and dist.is_initialized()):
            return _Group(None, 0, 1)
        group = process_group if process_group is not None else dist.group.WORLD
        return _Group(group, dist.get_rank(group), dist.get_world_size(group))

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.size > 1:
            CommCounter.record("all_reduce", t)
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's ``t`` (``sizes[r]`` rows on rank ``r``) concatenated in rank order."""
        if self.size == 1:
            return t
        longest = max(sizes)
        padded = t
        if t.shape[0] < longest:
            padded = t.new_zeros((longest, *t.shape[1:]))
            padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        CommCounter.record("all_gather", padded)
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    def reduce_scatter(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The sum over ranks of ``t`` (rows laid out as :meth:`all_gather` returns them), this
        rank's rows only."""
        if self.size == 1:
            return t
        longest = max(sizes)
        padded = t.new_zeros((self.size, longest, *t.shape[1:]))
        for r, chunk in enumerate(t.split(sizes, dim=0)):
            padded[r, : sizes[r]] = chunk
        if dist.get_backend(self.group) == "nccl":
            out = t.new_empty((longest, *t.shape[1:]))
            CommCounter.record("reduce_scatter", padded)
            dist.reduce_scatter_tensor(out, padded, group=self.group)
        else:  # gloo has no reduce-scatter
            CommCounter.record("all_reduce", padded)
            dist.all_reduce(padded, group=self.group)
            out = padded[self.rank]
        return out[: sizes[self.rank]]

    def sizes(self, n: int, device: torch.device) -> list[int]:
        if self.size == 1:
            return [n]
        mine = torch.tensor([n], device=device, dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        CommCounter.record("all_gather", mine)
        dist.all_gather(parts, mine, group=self.group)
        return [int(p.item()) for p in parts]


class _GatherRows(torch.autograd.Function):
    """All-gather of rows whose backward reduce-scatters the gradient, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: _Group, sizes: list[int], grad_scale: float):
        ctx.group, ctx.sizes, ctx.grad_scale = group, sizes, grad_scale
        return group.all_gather(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mine = ctx.group.reduce_scatter(grad.contiguous(), ctx.sizes)
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine, None, None, None


def gather_embeddings(
    x: torch.Tensor, labels: torch.Tensor, process_group=None, grad_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows of ``x`` and ``labels`` in rank order; ranks may hold different numbers.

    Differentiable in ``x``: rank ``r``'s rows receive the sum over ranks of the gradient with
    respect to them, multiplied by ``grad_scale`` (see the module docstring on DDP). The labels are
    gathered without a gradient. Costs one all-gather of ``R`` integers (the row counts), one of the
    labels and one of ``x``; the backward one reduce-scatter of ``N x d``.
    """
    group = _Group.of(process_group)
    sizes = group.sizes(x.shape[0], x.device)
    all_labels = group.all_gather(labels, sizes)
    return _GatherRows.apply(x, group, sizes, float(grad_scale)), all_labels


class _AllReduceSum(torch.autograd.Function):
    """``sum_r x_r`` on every rank. Backward: identity, because every rank holds the same loss and
    so the same upstream gradient ``dL/dy``, which is ``dL/dx_r`` for each rank's own ``x_r``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: _Group) -> torch.Tensor:
        return group.all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _MergeLogSumExp(torch.autograd.Function):
    """``LSE_i = log sum_r exp(lse_i^r)`` over the ranks of ``group``, from O(N) communication.

    Forward: ``M_i = max_r lse_i^r`` (all-reduce MAX), then
    ``LSE_i = M_i + log sum_r exp(lse_i^r - M_i)`` (all-reduce SUM of the rescaled sums). A rank
    with no logit in row ``i`` sends ``-inf`` and contributes ``exp(-inf) = 0``.

    Backward, local: ``dLSE_i/dlse_i^r = exp(lse_i^r - LSE_i)``, the share of rank ``r`` in row
    ``i`` (zero where ``lse_i^r = -inf``).
    """

    @staticmethod
    def forward(ctx, lse: torch.Tensor, group: _Group) -> torch.Tensor:
        m = group.all_reduce(lse.detach().clone(), dist.ReduceOp.MAX if group.size > 1 else None)
        # A row with no logit on any rank stays -inf; shift it by 0 rather than by -inf (NaN).
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        total = group.all_reduce(torch.exp(lse - m))
        out = m + torch.log(total)
        ctx.save_for_backward(lse, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lse, out = ctx.saved_tensors
        share = torch.where(torch.isfinite(lse), torch.exp(lse - out), torch.zeros_like(lse))
        return share * grad, None


def merge_terms(
    terms: tuple[torch.Tensor, torch.Tensor],
    spec: LossSpec,
    labels: torch.Tensor,
    regularizer: torch.Tensor,
    process_group=None,
) -> torch.Tensor:
    """The loss from this rank's unreduced terms (the ``similarity_terms`` contract) and its
    partial regulariser sum ``regularizer`` (already weighted by ``tau`` and divided by the global
    ``C * K * (K - 1)``); the same scalar on every rank.

    ``spec`` describes the *global* loss (its ``num_classes`` is ``C``); ``labels`` are the gathered
    global labels. With one rank (``process_group=None`` outside torch.distributed) this is the
    single-process loss written in the same terms.
    """
    group = _Group.of(process_group)
    if spec.column_wise:
        pos, neg = terms
        num_present = torch.unique(labels).numel()
        partial = pos.sum() / num_present + neg.sum() / spec.num_classes + regularizer
        return _AllReduceSum.apply(partial, group)
    lse, extra = terms
    merged = _MergeLogSumExp.apply(lse, group)
    summed = _AllReduceSum.apply(torch.cat([extra, regularizer.reshape(1).to(extra.dtype)]), group)
    return row_losses(torch.stack((merged, summed[:-1])), spec).mean() + summed[-1]


# -- the module ---------------------------------------------------------------------------------

def _loss_name(loss) -> str:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        return loss
    for name, cls in LOSS_CLASSES.items():
        if loss is cls:
            return name
    raise TypeError(f"loss must be a loss name {LOSSES} or one of the mpa_kernels loss classes, "
                    f"got {loss!r}")


def _hyperparameters(name: str, kwargs: dict) -> tuple[dict, float]:
    """The keyword arguments of the single-process loss class ``name`` (its defaults filled in), as
    the ``LossSpec`` fields and ``tau``. Unknown keywords raise the class's own TypeError."""
    cls = LOSS_CLASSES[name]
    sig = inspect.signature(cls.__init__)
    bound = sig.bind(None, 2, 1, **kwargs)  # self, num_classes, embedding_size: checked elsewhere
    bound.apply_defaults()
    a = bound.arguments
    if name == "proxy_nca":
        return dict(proxies_per_class=1, alpha=2.0 * a["scale"], delta=0.0, gamma=0.1,
                    similarity="softmax"), 0.0
    if name == "proxy_anchor":
        return dict(proxies_per_class=1, alpha=a["alpha"], delta=a["delta"], gamma=0.1,
                    similarity="softmax"), 0.0
    return dict(proxies_per_class=a["proxies_per_class"], alpha=a["alpha"], delta=a["delta"],
                gamma=a["gamma"], similarity=a["similarity"]), a["tau"]


class ClassParallelLoss(nn.Module):
    """A proxy loss whose proxies are sharded by class across the ranks of ``process_group``.

    ``loss`` is a name (``"mpa"``, ``"mpa_dw"``, ...) or a single-process loss class
    (``mpa_kernels.MPALoss``, ...); ``**hyperparameters`` are that class's keyword arguments
    (``proxies_per_class``, ``alpha``, ``delta``, ``gamma``, ``tau``, ``similarity``, or ``scale``
    for ProxyNCA) with its defaults. ``forward(embeddings, labels)`` takes this rank's embeddings
    (N_r, d) and their *global* labels in ``[0, num_classes)``; it returns the loss of the whole
    gathered batch, the same scalar on every rank.

    ``proxies`` holds the ``(c1 - c0) * K`` rows of the classes ``class_range = (c0, c1)``;
    ``state_dict()`` holds this shard and its range; :meth:`full_state_dict` and
    :meth:`load_state_dict` (which accepts a full ``(C * K, d)`` tensor and slices it) re-shard
    between any numbers of ranks and the single-process loss module. Outside torch.distributed
    (``process_group=None`` and no default group) it is the single-process loss.

    ``backend``: any backend of the single-process losses (``"auto"``, their default, picks as
    they do, for this rank's classes and the gathered batch); its ``proxy_terms`` when it has
    them (the proxies normalised and eq. 3 formed in its own sweep, no copy), else its
    ``similarity_terms``. fp16/bf16 inputs reach a low-precision backend (``"triton"``,
    ``"triton-linear"``) as they are and the others as fp32 copies, as in the single-process
    losses.

    ``ddp_average``: multiply the embedding gradient by the group size so that a backbone wrapped
    in DDP (which averages gradients over ranks) steps as one process on the global batch would.

    ``sample_rate < 1`` (PartialFC's class sampling; off by default) is an *approximation*: in
    training mode each rank keeps its classes that have a positive in the global batch plus a
    uniform random share of the others, ``max(#positives, ceil(sample_rate * C_r))`` in all, and
    the loss is the exact loss over the kept classes only (``C`` in the normalisers becomes the
    number kept over all ranks, one more all-reduce of one integer). Only the kept proxies get a
    gradient; :attr:`sampled_classes` says which (global ids). In eval mode the loss is the full
    one.
    """

    def __init__(
        self,
        loss,
        num_classes: int,
        embedding_size: int,
        *,
        process_group=None,
        backend: str = "auto",
        ddp_average: bool = True,
        sample_rate: float = 1.0,
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **hyperparameters,
    ) -> None:
        super().__init__()
        name = _loss_name(loss)
        check_int("num_classes", num_classes, 2)
        check_int("embedding_size", embedding_size)
        check_backend_name(backend)
        check_number("sample_rate", sample_rate, positive=True)
        if sample_rate > 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = float(sample_rate)
        self.sampled_classes: torch.Tensor | None = None
        fields, tau = _hyperparameters(name, hyperparameters)
        check_loss_hyperparameters(name, num_classes, fields["proxies_per_class"], fields["alpha"],
                                   fields["delta"], fields["gamma"], tau, fields["similarity"])
        self.spec = LossSpec(name, num_classes, **fields, tau=float(tau))
        self.tau = self.spec.tau
        self._group = _Group.of(process_group)
        self.process_group = process_group
        self.class_range = class_ranges(num_classes, self._group.size)[self._group.rank]
        c0, c1 = self.class_range
        self.local_spec = self.spec.shard_of(c1 - c0)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.proxies_per_class = self.spec.proxies_per_class
        self.backend, self.ddp_average, self.validate = backend, ddp_average, validate
        k = self.proxies_per_class
        self.proxies = nn.Parameter(
            torch.empty((c1 - c0) * k, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def loss_name(self) -> str:
        return self.spec.loss

    @property
    def world_size(self) -> int:
        return self._group.size

    @property
    def rank(self) -> int:
        return self._group.rank

    # Classes per block of the initialisation (a block is drawn whole, then cut to the shard).
    _INIT_BLOCK = 4096

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The single-process modules' distribution (``kaiming_normal_``, fan-out ``C * K``), drawn
        so that the proxies of a class do not depend on the number of ranks: one number from the
        global RNG seeds every block of :attr:`_INIT_BLOCK` classes. Ranks seeded alike therefore
        hold the shards of the same full tensor, and a class-parallel run with R ranks starts where
        one with R' ranks does; no rank ever materialises more than one block."""
        k, d = self.proxies_per_class, self.embedding_size
        std = math.sqrt(2.0 / (self.num_classes * k))
        base = int(torch.randint(0, 2**62, (1,)).item())
        c0, c1 = self.class_range
        device, dtype = self.proxies.device, self.proxies.dtype
        for b0 in range(c0 - c0 % self._INIT_BLOCK, c1, self._INIT_BLOCK):
            b1 = min(b0 + self._INIT_BLOCK, self.num_classes)
            g = torch.Generator(device=device).manual_seed(base + b0 // self._INIT_BLOCK)
            block = torch.randn((b1 - b0) * k, d, generator=g, device=device, dtype=dtype)
            lo, hi = max(b0, c0), min(b1, c1)
            self.proxies[(lo - c0) * k:(hi - c0) * k] = block[(lo - b0) * k:(hi - b0) * k] * std

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError("embeddings and labels must be torch.Tensors")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have shape (N, {self.embedding_size}), got "
                             f"{tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        dtype = torch.promote_types(embeddings.dtype, self.proxies.dtype)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            # Raw rows cross the wire (in the inputs' precision); each rank normalises the
            # gathered batch itself, as the single-process front end normalises its batch.
            x_all, y_all = gather_embeddings(
                embeddings.to(dtype), labels.long(), self.process_group,
                grad_scale=self._group.size if self.ddp_average else 1.0)
            if x_all.shape[0] == 0:
                raise ValueError("empty batch: no rank has embeddings")
            # Every rank checks the same gathered batch, so all raise together (no deadlock).
            if self.validate and (int(y_all.min()) < 0 or int(y_all.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                                 f"[{int(y_all.min())}, {int(y_all.max())}]")
            if self.validate and not all_finite(x_all):
                raise ValueError("embeddings contain NaN or infinite values (on some rank)")
            impl = self._backend(embeddings.device, x_all.shape[0], dtype)
            if dtype in _HALF and not impl.LOW_PRECISION:
                dtype = torch.float32
            x_all = unit_rows(x_all.to(dtype))
            w = self.proxies.to(dtype)
            y_local, spec, local_spec = y_all - self.class_range[0], self.spec, self.local_spec
            if self.sample_rate < 1 and self.training:
                w, y_local, spec, local_spec = self._sample(w, y_local)
            regularize = self.tau != 0.0 and self.proxies_per_class > 1
            if hasattr(impl, "proxy_terms"):
                # The backend normalises the proxies and forms eq. 3 in its own sweep: no
                # C_r*K*d copy of them (nor of their gradient) is made.
                terms, reg = impl.proxy_terms(x_all, w, y_local, local_spec)
                terms, reg = first_order_guard(impl, terms), first_order_guard(impl, reg)
            else:
                w_hat = unit_rows(w)
                terms = first_order_guard(
                    impl, impl.similarity_terms(x_all, w_hat, y_local, local_spec))
                reg_dtype = torch.float32 if dtype in _HALF else dtype
                reg = (unit_proxy_regularizer(w_hat.to(reg_dtype), self.proxies_per_class)
                       if regularize else None)
            # eq. 3 over the local classes, renormalised from C_local*K*(K-1) to C*K*(K-1)
            reg = (self.tau * reg * (local_spec.num_classes / spec.num_classes) if regularize
                   else terms.new_zeros(()))
            return merge_terms(terms, spec, y_all, reg, self.process_group)

    def _backend(self, device: torch.device, batch_size: int, dtype: torch.dtype):
        """The backend module: one whose unreduced terms (``proxy_terms`` or
        ``similarity_terms``) the ranks can merge, as ``reduction="none"`` needs them too.
        ``"auto"`` decides on the gathered batch and this rank's classes (its memory)."""
        try:
            return resolve(self.backend, device, self.local_spec, batch_size, dtype.itemsize,
                           reduction="none")
        except BackendUnavailableError as err:
            raise BackendUnavailableError(
                f"class-parallel losses merge the backend's unreduced terms across ranks: {err}"
            ) from err

    def _sample(self, w: torch.Tensor, y_local: torch.Tensor):
        """The kept classes' proxies, the labels renumbered among them (-1: another rank's class),
        and the global and local specs narrowed to the kept counts (see ``sample_rate``)."""
        c_local, k = self.class_range[1] - self.class_range[0], self.proxies_per_class
        mine = (y_local >= 0) & (y_local < c_local)
        present = torch.zeros(c_local, dtype=torch.bool, device=w.device)
        present[y_local[mine]] = True
        keep = max(int(present.sum()), math.ceil(self.sample_rate * c_local))
        score = torch.rand(c_local, device=w.device).masked_fill_(present, 2.0)
        kept = score.topk(keep).indices.sort().values
        self.sampled_classes = kept + self.class_range[0]
        renumber = torch.full((c_local,), -1, dtype=torch.long, device=w.device)
        renumber[kept] = torch.arange(keep, device=w.device)
        y_kept = torch.where(mine, renumber[y_local.clamp(0, c_local - 1)], -1)
        rows = (kept[:, None] * k + torch.arange(k, device=w.device)).reshape(-1)
        total = int(self._group.all_reduce(torch.tensor([keep], device=w.device)).item())
        return w[rows], y_kept, self.spec.shard_of(total), self.spec.shard_of(keep)

    # -- checkpoints: shards that re-shard -------------------------------------------------------
    def get_extra_state(self) -> dict:
        # The single-process modules' extra state (the loss's spec) plus the shard's class range,
        # so that a full-C state dict of either kind loads into the other.
        return {"spec": self.spec.to_dict(), "class_range": self.class_range}

    def set_extra_state(self, state: dict) -> None:
        # The proxies were checked (and sliced) in _load_from_state_dict; nothing to restore.
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key, extra_key = prefix + "proxies", prefix + "_extra_state"
        if key in state_dict:
            state_dict[key] = self._shard_of(state_dict[key], state_dict.get(extra_key))
        if extra_key not in state_dict:  # a full-C state dict of the single-process module
            state_dict[extra_key] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _shard_of(self, proxies: torch.Tensor, extra: dict | None) -> torch.Tensor:
        """This rank's rows of a saved proxy tensor: a full ``(C * K, d)`` one (any number of
        ranks wrote it through :meth:`full_state_dict`, or the single-process module), or a shard
        whose saved ``class_range`` is this rank's."""
        k, d = self.proxies_per_class, self.embedding_size
        c0, c1 = self.class_range
        if extra is not None:
            spec = extra.get("spec") if isinstance(extra, dict) else None
            if not isinstance(spec, dict):
                raise ValueError(f"not the state of an mpa-kernels loss: {extra!r}")
            saved_grouping = (spec.get("loss"), spec.get("num_classes"),
                              spec.get("proxies_per_class"))
            if saved_grouping != (self.spec.loss, self.num_classes, k):
                raise ValueError(
                    f"checkpoint has loss={saved_grouping[0]!r}, num_classes={saved_grouping[1]}, "
                    f"proxies_per_class={saved_grouping[2]}; this loss has loss="
                    f"{self.spec.loss!r}, num_classes={self.num_classes}, proxies_per_class={k}")
            saved = tuple(extra.get("class_range", (0, self.num_classes)))
            if saved == (0, self.num_classes):
                extra = None  # a full tensor: slice it below
            elif saved != (c0, c1):
                raise ValueError(
                    f"checkpoint shard holds classes {saved}, this rank owns {(c0, c1)}: merge "
                    "the shards with merge_full_state_dicts (or save with full_state_dict) to "
                    "load on a different number of ranks")
            else:
                return proxies
        if proxies.dim() != 2 or proxies.shape[1] != d:
            raise ValueError(f"checkpoint proxies have shape {tuple(proxies.shape)}; expected "
                             f"({self.num_classes * k}, {d})")
        if proxies.shape[0] != self.num_classes * k:
            raise ValueError(
                f"checkpoint proxies have {proxies.shape[0]} rows; this loss has num_classes="
                f"{self.num_classes} x proxies_per_class={k} = {self.num_classes * k}")
        return proxies[c0 * k: c1 * k]

    @torch.no_grad()
    def full_proxies(self) -> torch.Tensor:
        """All ``C * K`` proxies, gathered from every rank (a collective: call it on all ranks)."""
        k = self.proxies_per_class
        sizes = [(c1 - c0) * k for c0, c1 in class_ranges(self.num_classes, self._group.size)]
        return self._group.all_gather(self.proxies.detach(), sizes)

    def full_state_dict(self) -> dict:
        """A state dict with all ``C * K`` proxies (a collective), loadable by this class with any
        number of ranks and by the single-process loss module of the same loss."""
        return {"proxies": self.full_proxies(), "_extra_state": {"spec": self.spec.to_dict()}}

    def extra_repr(self) -> str:
        return (f"loss={self.spec.loss!r}, num_classes={self.num_classes}, class_range="
                f"{self.class_range}, embedding_size={self.embedding_size}, proxies_per_class="
                f"{self.proxies_per_class}, rank={self.rank}/{self.world_size}, "
                f"backend={self.backend!r}")


def merge_full_state_dicts(shards: list[dict], prefix: str = "") -> dict:
    """One full-C state dict from the per-rank ``state_dict()`` of every shard of a
    :class:`ClassParallelLoss` (in any order), for loading with any number of ranks. Raises a
    ValueError when the shards disagree on ``C`` or ``K`` or do not cover the classes once."""
    metas = [s[prefix + "_extra_state"] for s in shards]
    if len({tuple(sorted(m["spec"].items())) for m in metas}) != 1:
        raise ValueError("shards disagree on the loss or its hyper-parameters")
    order = sorted(range(len(shards)), key=lambda i: metas[i]["class_range"][0])
    end = 0
    for i in order:
        c0, c1 = metas[i]["class_range"]
        if c0 != end:
            raise ValueError(f"shards do not tile the classes: a gap or overlap at class {end}")
        end = c1
    if end != metas[0]["spec"]["num_classes"]:
        raise ValueError(f"shards cover classes [0, {end}) of {metas[0]['spec']['num_classes']}")
    proxies = torch.cat([shards[i][prefix + "proxies"] for i in order])
    return {prefix + "proxies": proxies, prefix + "_extra_state": {"spec": metas[0]["spec"]}}
