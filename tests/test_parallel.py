"""Class-parallel losses across gloo processes equal the single-process loss on the global batch.

Each world size is one ``torch.multiprocessing`` spawn that runs every case (process start-up is
the expensive part) and writes what rank 0 gathered; the tests compare it with the single-process
loss module of the same loss on the same batch and proxies (float64, the reference backend).
``BACKENDS_UNDER_TEST`` names the backends checked, each with its dtype, tolerance and cases. The
Triton backends run through the interpreter on CPU (conftest.py sets ``TRITON_INTERPRET=1``
before the spawn, and the workers inherit it), slowly: in float32, on the case with unequal
shards, absent classes and ranks without positives, and ``triton`` also on the one with a sample
and (3 ranks) a class per rank; the training step, re-sharding, traffic and
class sampling, which use the backend's terms only as the equivalence does, run on the two
CPU backends.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpa_kernels.backends import BackendUnavailableError
from mpa_kernels.parallel import (
    LOSS_CLASSES,
    ClassParallelLoss,
    CommCounter,
    class_ranges,
    merge_full_state_dicts,
)

WORLD_SIZES = (3, 2)  # 3 first: it writes the shards that the 2-rank run re-loads
LOSSES = tuple(LOSS_CLASSES)
D = 5

# (name, C, K, labels per rank): unequal shards (C not divisible by R), classes absent from the
# batch, every positive on rank 0's classes (the other ranks own none), one sample per rank (and,
# with 3 ranks, one class per rank), and unequal batch shares.
CASES = {
    "mixed": (11, 3, lambda r, R: [(5 * r + 3 * j) % 11 for j in range(3)]),
    "one_owner": (11, 2, lambda r, R: [0, 1, r % 2]),
    "n1": (3, 2, lambda r, R: [(4 * r + 1) % 3]),
    "unequal_n": (8, 3, lambda r, R: list(range(r, 2 * r + 2))),
}

# backend: (dtype, relative tolerance, cases); None: every case, and the other checks too.
BACKENDS_UNDER_TEST = {
    "reference": (torch.float64, 1e-12, None),
    "torch": (torch.float64, 1e-12, None),
    "triton": (torch.float32, 1e-5, ("one_owner", "n1")),
    "triton-linear": (torch.float32, 1e-5, ("one_owner", "n1")),
}
FULL = [b for b, (_, _, cases) in BACKENDS_UNDER_TEST.items() if cases is None]
EQUIVALENCE = [(b, case) for b, (_, _, cases) in BACKENDS_UNDER_TEST.items()
               for case in (cases or CASES)]


def _hyper(name: str, K: int) -> dict:
    if name in ("proxy_anchor", "proxy_nca"):
        return {}
    # A non-default similarity on one loss, so "max" and "mean" also cross ranks.
    return {"proxies_per_class": K, "similarity": {"mpa_ap": "max", "soft_triple": "mean"}.get(
        name, "softmax")}


def _batch(case: str, R: int, dtype) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    C, K, labels_of = CASES[case]
    g = torch.Generator().manual_seed(list(CASES).index(case))
    ys = [torch.tensor(labels_of(r, R), dtype=torch.long) for r in range(R)]
    xs = [torch.randn(len(y), D, generator=g, dtype=dtype) for y in ys]
    proxies = torch.randn(C * K, D, generator=g, dtype=dtype)
    return xs, ys, proxies


def _gather_rows(t: torch.Tensor, R: int) -> torch.Tensor:
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(R)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]]))
    longest = int(max(sizes).item())
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(R)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())] for p, n in zip(parts, sizes)])


def _equivalence(rank: int, R: int, backend: str, dtype, cases) -> dict:
    out = {}
    for case in cases:
        K = CASES[case][1]
        xs, ys, proxies = _batch(case, R, dtype)
        for name in LOSSES:
            k = 1 if name in ("proxy_anchor", "proxy_nca") else K
            loss_fn = ClassParallelLoss(name, CASES[case][0], D, backend=backend, dtype=dtype,
                                        ddp_average=False, **_hyper(name, K))
            loss_fn.load_state_dict({"proxies": proxies[: CASES[case][0] * k]})
            x = xs[rank].clone().requires_grad_(True)
            loss = loss_fn(x, ys[rank])
            loss.backward()
            losses = _gather_rows(loss.detach().reshape(1), R)
            out[case, name] = {"losses": losses, "x_grad": _gather_rows(x.grad, R),
                               "w_grad": _gather_rows(loss_fn.proxies.grad, R)}
    return out


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, D, dtype=torch.float64)


def _train_batch():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 8, 1, 5])
    net = _Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    proxies = torch.randn(9 * 2, D, generator=g, dtype=torch.float64)
    return x, y, net, proxies


def _train_step(rank: int, R: int, backend: str) -> dict:
    """One SGD step of a DDP backbone and class-parallel proxies (each rank 6 / R samples)."""
    out = {}
    for name in ("mpa", "mpa_dw"):
        x, y, net, proxies = _train_batch()
        ddp = torch.nn.parallel.DistributedDataParallel(net.lin)
        loss_fn = ClassParallelLoss(name, 9, D, proxies_per_class=2, backend=backend,
                                    dtype=torch.float64)
        loss_fn.load_state_dict({"proxies": proxies})
        opt = torch.optim.SGD([{"params": ddp.parameters(), "lr": 0.5},
                               {"params": loss_fn.parameters(), "lr": 2.0}])
        n = 6 // R
        loss_fn(ddp(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
        opt.step()
        out[name] = {"weight": net.lin.weight.detach().clone(),
                     "bias": net.lin.bias.detach().clone(), "proxies": loss_fn.full_proxies()}
    return out


def _reshard_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(12, D, generator=g, dtype=torch.float64), torch.arange(12) % 10


def _reshard(rank: int, R: int, backend: str, shard_dir: Path) -> dict:
    x, y = _reshard_batch()
    n = 12 // R
    if R == 3:
        loss_fn = ClassParallelLoss("mpa_dw", 10, D, proxies_per_class=3, backend=backend,
                                    dtype=torch.float64)
        torch.save(loss_fn.state_dict(), shard_dir / f"shard{rank}.pt")
        full = loss_fn.full_state_dict()
        if rank == 0:
            torch.save(full, shard_dir / "full.pt")
    else:
        shards = [torch.load(shard_dir / f"shard{r}.pt") for r in range(3)]
        loss_fn = ClassParallelLoss("mpa_dw", 10, D, proxies_per_class=3, backend=backend,
                                    dtype=torch.float64)
        loss_fn.load_state_dict(merge_full_state_dicts(shards))
        from_full = ClassParallelLoss("mpa_dw", 10, D, proxies_per_class=3, backend=backend,
                                      dtype=torch.float64)
        from_full.load_state_dict(torch.load(shard_dir / "full.pt"))
        assert torch.equal(from_full.proxies, loss_fn.proxies)
        errors = []
        for bad, kwargs in (("C", dict(num_classes=11, proxies_per_class=3)),
                            ("K", dict(num_classes=10, proxies_per_class=2))):
            other = ClassParallelLoss("mpa_dw", kwargs.pop("num_classes"), D, dtype=torch.float64,
                                      **kwargs)
            try:
                other.load_state_dict(merge_full_state_dicts(shards))
            except ValueError as err:
                errors.append(str(err))
        try:  # a 3-rank shard into a 2-rank module: a different class range
            loss_fn.load_state_dict(shards[rank])
        except ValueError as err:
            errors.append(str(err))
        if rank == 0:
            torch.save(errors, shard_dir / "errors.pt")
    loss = loss_fn(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
    torch.manual_seed(11)
    fresh = ClassParallelLoss("mpa", 9000, 3, proxies_per_class=2)  # three initialisation blocks
    return {"loss": loss.detach(), "proxies": loss_fn.full_proxies(), "init": fresh.full_proxies()}


def _traffic(rank: int, R: int, backend: str, dtype) -> dict:
    """Bytes each collective carries in one forward + backward, at two class counts."""
    out = {}
    for name in ("mpa", "mpa_dw"):
        for C in (12, 120):
            loss_fn = ClassParallelLoss(name, C, D, proxies_per_class=2, backend=backend,
                                        dtype=dtype)
            x = torch.randn(2, D, dtype=dtype, requires_grad=True)
            with CommCounter() as comm:
                loss_fn(x, torch.tensor([0, 5])).backward()
            out[name, C] = comm.bytes
    return out


def _sampled(rank: int, R: int, backend: str, dtype) -> dict:
    """PartialFC-style class sampling over the ranks: loss, gradients and the kept classes."""
    out = {}
    C, K, _ = CASES["mixed"]
    xs, ys, proxies = _batch("mixed", R, dtype)
    for name in LOSSES:
        k = 1 if name in ("proxy_anchor", "proxy_nca") else K
        torch.manual_seed(rank)  # ranks sample independently
        loss_fn = ClassParallelLoss(name, C, D, backend=backend, dtype=dtype, ddp_average=False,
                                    sample_rate=0.7, **_hyper(name, K))
        loss_fn.load_state_dict({"proxies": proxies[: C * k]})
        x = xs[rank].clone().requires_grad_(True)
        loss = loss_fn(x, ys[rank])
        loss.backward()
        out[name] = {"loss": loss.detach(), "x_grad": _gather_rows(x.grad, R),
                     "w_grad": _gather_rows(loss_fn.proxies.grad, R),
                     "kept": _gather_rows(loss_fn.sampled_classes, R)}
    return out


def _worker(rank: int, R: int, init_file: str, out_dir: str, backend: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=R)
    try:
        shard_dir = Path(out_dir)
        dtype, _, cases = BACKENDS_UNDER_TEST[backend]
        result = {"equivalence": _equivalence(rank, R, backend, dtype, cases or CASES)}
        if cases is None:
            result.update(train=_train_step(rank, R, backend),
                          reshard=_reshard(rank, R, backend, shard_dir),
                          traffic=_traffic(rank, R, backend, dtype),
                          sampled=_sampled(rank, R, backend, dtype))
        if rank == 0:
            torch.save(result, shard_dir / f"result{R}.pt")
        dist.barrier()  # no rank closes its connections while a peer still reads from them
    finally:
        dist.destroy_process_group()
    # Leave without Python's finalisation: gloo's threads may still be alive then, and a C++
    # thread destroyed while joinable aborts the process (SIGABRT) after a run that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@functools.cache
def _runs(backend: str):
    """What rank 0 of each world size gathered with ``backend`` (spawned once per backend)."""
    dtype, tol, cases = BACKENDS_UNDER_TEST[backend]
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for R in WORLD_SIZES:
            init_file = os.path.join(tmp, f"init{R}")
            mp.spawn(_worker, args=(R, init_file, tmp, backend), nprocs=R, join=True)
            results[R] = torch.load(Path(tmp) / f"result{R}.pt")
        if cases is None:
            results["errors"] = torch.load(Path(tmp) / "errors.pt")
    return backend, dtype, tol, results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _single(name: str, case: str, R: int, dtype, kept: torch.Tensor | None = None):
    """The single-process loss (reference backend, float64) on the case's global batch drawn in
    ``dtype``, over all classes or only ``kept`` (labels renumbered among them); the proxy
    gradient is returned for all C classes."""
    C, K, _ = CASES[case]
    xs, ys, proxies = _batch(case, R, dtype)
    dtype = torch.float64
    xs, proxies = [x.to(dtype) for x in xs], proxies.to(dtype)
    k = 1 if name in ("proxy_anchor", "proxy_nca") else K
    kept = torch.arange(C) if kept is None else kept
    rows = (kept[:, None] * k + torch.arange(k)).reshape(-1)
    single = LOSS_CLASSES[name](len(kept), D, backend="reference", dtype=dtype,
                                **_hyper(name, K))
    with torch.no_grad():
        single.proxies.copy_(proxies[: C * k][rows])
    x = torch.cat(xs).requires_grad_(True)
    loss = single(x, torch.searchsorted(kept, torch.cat(ys)))
    loss.backward()
    w_grad = torch.zeros(C * k, D, dtype=dtype)
    w_grad[rows] = single.proxies.grad
    return loss.detach(), x.grad, w_grad


@pytest.mark.parametrize("R", WORLD_SIZES)
@pytest.mark.parametrize("backend, case", EQUIVALENCE)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_and_gradients_match_single_process(backend, name, case, R):
    _, dtype, tol, results = _runs(backend)
    got = results[R]["equivalence"][case, name]
    loss, x_grad, w_grad = _single(name, case, R, dtype)
    assert torch.equal(got["losses"], got["losses"][:1].expand(R)), "ranks disagree on the loss"
    assert _rel(got["losses"][0], loss) <= tol
    assert _rel(got["x_grad"], x_grad) <= tol
    assert _rel(got["w_grad"], w_grad) <= tol


def test_cases_cover_the_edge_cases():
    """The grid holds what it claims: unequal shards, absent classes, a rank without positives."""
    for R in WORLD_SIZES:
        C, _, labels_of = CASES["mixed"]
        assert C % R and len({c1 - c0 for c0, c1 in class_ranges(C, R)}) == 2
        labels = {y for r in range(R) for y in labels_of(r, R)}
        assert len(labels) < C
        C, _, labels_of = CASES["one_owner"]
        c0, c1 = class_ranges(C, R)[-1]
        assert not any(c0 <= y < c1 for r in range(R) for y in labels_of(r, R))
        assert all(len(CASES["n1"][2](r, R)) == 1 for r in range(R))
    assert {c1 - c0 for c0, c1 in class_ranges(CASES["n1"][0], 3)} == {1}


@pytest.mark.parametrize("backend", FULL)
@pytest.mark.parametrize("R", WORLD_SIZES)
@pytest.mark.parametrize("name", ("mpa", "mpa_dw"))
def test_training_step_matches_single_process(backend, name, R):
    _, _, tol, results = _runs(backend)
    got = results[R]["train"][name]
    x, y, net, proxies = _train_batch()
    loss_fn = LOSS_CLASSES[name](9, D, proxies_per_class=2, backend="reference",
                                 dtype=torch.float64)
    with torch.no_grad():
        loss_fn.proxies.copy_(proxies)
    opt = torch.optim.SGD([{"params": net.parameters(), "lr": 0.5},
                           {"params": loss_fn.parameters(), "lr": 2.0}])
    loss_fn(net.lin(x), y).backward()
    opt.step()
    assert _rel(got["weight"], net.lin.weight.detach()) <= tol
    assert _rel(got["bias"], net.lin.bias.detach()) <= tol
    assert _rel(got["proxies"], loss_fn.proxies.detach()) <= tol


@pytest.mark.parametrize("backend", FULL)
def test_reshard_3_to_2_to_1(backend):
    _, _, _, results = _runs(backend)
    three, two = results[3]["reshard"], results[2]["reshard"]
    assert torch.equal(three["proxies"], two["proxies"])
    x, y = _reshard_batch()
    # One process: the class-parallel module outside torch.distributed and the plain loss module.
    alone = ClassParallelLoss("mpa_dw", 10, D, proxies_per_class=3, dtype=torch.float64)
    alone.load_state_dict({"proxies": three["proxies"]})
    single = LOSS_CLASSES["mpa_dw"](10, D, proxies_per_class=3, backend="reference",
                                    dtype=torch.float64)
    single.load_state_dict(alone.full_state_dict())
    assert torch.equal(alone.proxies, three["proxies"])
    losses = [three["loss"], two["loss"], alone(x, y).detach(), single(x, y).detach()]
    assert max(_rel(v, losses[-1]) for v in losses) <= 1e-12
    torch.manual_seed(11)
    fresh = ClassParallelLoss("mpa", 9000, 3, proxies_per_class=2)
    assert torch.equal(three["init"], fresh.proxies) and torch.equal(two["init"], fresh.proxies)
    errors = results["errors"]
    assert len(errors) == 3
    assert "num_classes=11" in errors[0] and "proxies_per_class=2" in errors[1]
    assert "this rank owns" in errors[2]


def test_backend_without_similarity_terms_is_refused(monkeypatch):
    from mpa_kernels.backends import _load

    module = _load("torch")
    monkeypatch.delattr(module, "similarity_terms")
    monkeypatch.delattr(module, "proxy_terms")
    loss_fn = ClassParallelLoss("mpa", 10, 4, backend="torch")
    with pytest.raises(BackendUnavailableError, match="class-parallel(.|\n)*similarity_terms"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 1]))


def test_errors_outside_distributed():
    with pytest.raises(ValueError, match="every rank must own"):
        class_ranges(3, 4)
    with pytest.raises(ValueError, match="unknown loss"):
        ClassParallelLoss("arcface", 10, 4)
    with pytest.raises(TypeError):
        ClassParallelLoss("mpa", 10, 4, scale=2.0)
    with pytest.raises(ValueError, match="tau"):
        ClassParallelLoss("mpa", 10, 4, tau=-1.0)
    loss_fn = ClassParallelLoss("mpa", 10, 4)
    with pytest.raises(ValueError, match="labels must lie"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="shape"):
        loss_fn(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        loss_fn(torch.tensor([[0.0, 1.0, 0.0, float("nan")]]), torch.tensor([0]))

    with pytest.raises(ValueError, match="rows"):
        loss_fn.load_state_dict({"proxies": torch.randn(10 * 10 + 1, 4)})
    assert loss_fn.class_range == (0, 10) and loss_fn.proxies.shape == (100, 4)


@pytest.mark.parametrize("backend", FULL)
@pytest.mark.parametrize("R", WORLD_SIZES)
def test_traffic_does_not_depend_on_the_class_count(backend, R):
    """Per rank, 2 samples of D numbers each: the gathers and the O(N) all-reduces, nothing of C."""
    _, dtype, _, results = _runs(backend)
    traffic = results[R]["traffic"]
    b, n = torch.empty((), dtype=dtype).element_size(), 2 * R
    gathers = {"all_gather": 8 + 2 * 8 + 2 * D * b}  # row count, labels, embeddings
    backward = {"all_reduce": R * 2 * D * b}  # gloo: all-reduce of the whole gradient, sliced
    expected = {"mpa": {"all_gather": gathers["all_gather"], "all_reduce": b + backward[
        "all_reduce"]},
        "mpa_dw": {"all_gather": gathers["all_gather"],
                   "all_reduce": (n + n + n + 1) * b + backward["all_reduce"]}}
    for name in ("mpa", "mpa_dw"):
        assert traffic[name, 12] == traffic[name, 120] == expected[name]


def test_bench_cost_model():
    from benchmarks.parallel_bench import SHAPES, nccl_cost_model

    big, small = (nccl_cost_model(SHAPES[s], "mpa_dw") for s in ("C1M", "C10k-control"))
    assert big["class_parallel_array_bytes"] == small["class_parallel_array_bytes"]
    assert big["data_parallel_proxy_grad_allreduce_bytes"] == 1_000_000 * 2 * 128 * 4
    assert big["per_rank_proxy_and_grad_bytes"]["class_parallel"] * 8 == \
        big["per_rank_proxy_and_grad_bytes"]["data_parallel"]


@pytest.mark.parametrize("backend", FULL)
@pytest.mark.parametrize("R", WORLD_SIZES)
@pytest.mark.parametrize("name", LOSSES)
def test_class_sampling_is_the_loss_over_the_kept_classes(backend, name, R):
    _, dtype, tol, results = _runs(backend)
    got = results[R]["sampled"][name]
    kept = got["kept"]
    C = CASES["mixed"][0]
    labels = torch.cat(_batch("mixed", R, dtype)[1])
    assert set(labels.tolist()) <= set(kept.tolist()) and len(kept) < C  # positives always kept
    loss, x_grad, w_grad = _single(name, "mixed", R, dtype, kept)
    assert _rel(got["loss"], loss) <= tol
    assert _rel(got["x_grad"], x_grad) <= tol
    assert _rel(got["w_grad"], w_grad) <= tol


def test_class_sampling_only_in_training_mode():
    loss_fn = ClassParallelLoss("mpa_dw", 40, 4, proxies_per_class=2, sample_rate=0.25,
                                dtype=torch.float64)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([1, 7, 7])
    loss_fn(x, y)
    assert len(loss_fn.sampled_classes) == 10  # ceil(0.25 * 40)
    assert {1, 7} <= set(loss_fn.sampled_classes.tolist())
    loss_fn.eval()
    full = LOSS_CLASSES["mpa_dw"](40, 4, proxies_per_class=2, backend="reference",
                                  dtype=torch.float64)
    full.load_state_dict(loss_fn.full_state_dict())
    assert _rel(loss_fn(x, y), full(x, y)) <= 1e-12
    with pytest.raises(ValueError, match="sample_rate"):
        ClassParallelLoss("mpa", 10, 4, sample_rate=1.5)


def _spy(monkeypatch, backend: str, entry: str) -> list:
    """Record the arguments of ``entry`` of ``backend``'s module on every call."""
    from mpa_kernels.backends import _load

    module, calls = _load(backend), []
    original = getattr(module, entry)

    def spy(x_hat, w, labels, spec, **kwargs):
        calls.append({"x_hat": x_hat, "w": w, "spec": spec})
        return original(x_hat, w, labels, spec, **kwargs)

    monkeypatch.setattr(module, entry, spy)
    return calls


# backend asked for, the backend "auto" resolves it to on CPU, its entry point, the compute dtype
# of float16 inputs (the low-precision backends keep it, the others get float32 copies).
PRECISION_CASES = [("reference", "reference", "similarity_terms", torch.float32),
                   ("torch", "torch", "proxy_terms", torch.float32),
                   ("auto", "torch", "proxy_terms", torch.float32),
                   ("triton", "triton", "similarity_terms", torch.float16)]


@pytest.mark.parametrize("backend, resolved, entry, compute_dtype", PRECISION_CASES)
def test_half_inputs_follow_the_backends_precision(monkeypatch, backend, resolved, entry,
                                                   compute_dtype):
    """Outside torch.distributed (one rank): half inputs reach the backend in its precision, and
    the loss and gradients are the single-process module's on the same backend and dtype."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, D, generator=g).half()
    y = torch.tensor([0, 2, 2, 4, 1, 0])
    proxies = torch.randn(5 * 2, D, generator=g).half()
    got = {}
    for kind in ("parallel", "single"):
        calls = _spy(monkeypatch, resolved, entry) if kind == "parallel" else None
        make = (ClassParallelLoss if kind == "parallel"
                else lambda *a, **k: LOSS_CLASSES[a[0]](*a[1:], **k))
        loss_fn = make("mpa_dw", 5, D, proxies_per_class=2, backend=backend, dtype=torch.float16)
        with torch.no_grad():
            loss_fn.proxies.copy_(proxies)
        xi = x.clone().requires_grad_(True)
        loss = loss_fn(xi, y)
        loss.backward()
        got[kind] = (loss.detach(), xi.grad, loss_fn.proxies.grad)
        monkeypatch.undo()
        if kind == "parallel":
            assert len(calls) == 1 and calls[0]["x_hat"].dtype == compute_dtype
            assert calls[0]["w"].dtype == compute_dtype and calls[0]["spec"].shard
    (loss, x_grad, w_grad), (loss1, x_grad1, w_grad1) = got["parallel"], got["single"]
    assert loss.dtype == loss1.dtype and x_grad.dtype == torch.float16
    assert _rel(loss.float(), loss1.float()) <= 1e-5
    assert _rel(x_grad.float(), x_grad1.float()) <= 2e-3
    assert _rel(w_grad.float(), w_grad1.float()) <= 2e-3


def test_raw_proxies_reach_proxy_terms_uncopied(monkeypatch):
    """A backend with proxy_terms gets the proxy parameter itself: no normalised copy is made."""
    calls = _spy(monkeypatch, "torch", "proxy_terms")
    loss_fn = ClassParallelLoss("mpa", 6, D, proxies_per_class=2, backend="torch")
    loss_fn(torch.randn(3, D), torch.tensor([0, 5, 5])).backward()
    assert len(calls) == 1 and calls[0]["w"] is loss_fn.proxies
    assert loss_fn.proxies.grad is not None


def test_shard_spec():
    """A shard of a loss's classes may hold one class; a whole loss needs two, and records no
    shard flag (its state_dict entry is unchanged)."""
    from mpa_kernels._spec import LossSpec

    spec = LossSpec("mpa_dw", 10, 3, 32.0, 0.1, tau=0.2)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        LossSpec("mpa_dw", 1, 3, 32.0, 0.1)
    shard = spec.shard_of(1)
    assert shard.shard and shard.num_classes == 1
    assert (shard.loss, shard.proxies_per_class, shard.alpha, shard.tau) == ("mpa_dw", 3, 32.0, 0.2)
    assert "shard" not in spec.to_dict() and LossSpec.from_dict(spec.to_dict()) == spec
    assert LossSpec.from_dict(shard.to_dict()) == shard
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        spec.shard_of(0)
    with pytest.raises(TypeError, match="shard"):
        LossSpec("mpa", 4, 1, 32.0, 0.1, shard=1)
