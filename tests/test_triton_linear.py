"""The ``"triton-linear"`` backend (fused-linear kernels) against the reference.

Value and both gradients (embeddings and proxies, through the normalisation) through the public
functional API for every reduction, and the backend's terms with a gradient of their own (labels
outside [0, C) included). On CPU the kernels run in the Triton interpreter (conftest.py sets
``TRITON_INTERPRET=1``) with 32-wide tiles, so the shapes below span several row tiles, class tiles,
d chunks and splits while staying tiny; on a GPU the same checks run on CUDA, bf16 included. The
reference runs in fp64 on the very inputs the backend sees (fp16/bf16-rounded for the
low-precision cases), so the tolerances measure the backend's own error.
"""

import itertools

import pytest
import torch
import torch.nn.functional as tF

import mpa_kernels.functional as F
from mpa_kernels._spec import LossSpec
from mpa_kernels.backends import BackendUnavailableError, resolve
from mpa_kernels.backends import triton_linear
from mpa_kernels.kernels import linear
from tests.conftest import HAS_CUDA, requires_cuda
from tests.test_triton_compile import record_launches
from tests.test_triton_custom_op import assert_compiles_to_single_ops
# The same losses, K values and input makers as the "triton" backend's tests (one place for both).
from tests.test_triton_similarity import (
    KS,
    LOSSES,
    REDUCTIONS,
    SIMILARITIES,
    _edge_labels,
    _inputs,
    _value_and_grads,
)

BACKEND = "triton-linear"
# (N, C, d): N = 1, N not a multiple of the 32-row tile, C not a power of two (nor a multiple of
# the classes per tile), d not a multiple of the 32-wide d chunk, d below one chunk, d over two.
SHAPES = ((1, 3, 40), (37, 7, 40), (33, 13, 16), (5, 11, 70))
# Relative error bounds (max |diff| / max |reference|): fp32 is exact up to rounding; fp16/bf16
# inputs are normalised in their dtype and the dots round ds to it (bf16: 8 significant bits).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 2e-1}


def _reduction(i, loss):
    reduction = REDUCTIONS[i % len(REDUCTIONS)]
    return "mean" if loss == "mpa" and reduction == "sum" else reduction


def _cases():
    """Every loss x K x similarity (one similarity for K = 1, where all modes agree), each with a
    shape from the grid, the default (atomic) or deterministic backward and a reduction in turn,
    so the grid is covered without its full product."""
    combos = [(loss, k, sim) for loss, k, sim in itertools.product(LOSSES, KS, SIMILARITIES)
              if k > 1 or sim == "softmax"]
    return [(*combo, *SHAPES[i % len(SHAPES)], i % 3 == 1, _reduction(i // 3, combo[0]))
            for i, combo in enumerate(combos)]


def _assert_matches_reference(fn, x, y, w, **kw):
    tol = TOLERANCE[x.dtype]
    got = _value_and_grads(fn, x, y, w, BACKEND, **kw)
    want = _value_and_grads(fn, x.double(), y, w.double(), "reference", **kw)
    assert got[1].dtype == x.dtype and got[2].dtype == w.dtype
    for name, a, b in zip(("loss", "d_embeddings", "d_proxies"), got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        # A loss is a difference of terms of size ~alpha (SoftTriple's lse - z_y): its error is
        # measured against 1, not against its own size.
        scale = b.abs().max().clamp_min(1.0 if name == "loss" else 1e-6)
        err = float((a.double() - b).abs().max() / scale)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("loss,k,similarity,n,c,d,deterministic,reduction", _cases())
def test_matches_reference_fp32(loss, k, similarity, n, c, d, deterministic, reduction,
                                monkeypatch):
    monkeypatch.setattr(triton_linear, "DETERMINISTIC", deterministic)
    x, y, w = _inputs(n, c, k, torch.float32, "cpu", d)
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k, similarity=similarity,
                              reduction=reduction)


@pytest.mark.parametrize("loss,k,similarity", [
    (loss, k, sim) for loss in LOSSES for k, sim in ((1, "softmax"), (3, "max"), (10, "softmax"),
                                                     (2, "mean"))
])
def test_matches_reference_fp16(loss, k, similarity):
    x, y, w = _inputs(37, 7, k, torch.float16, "cpu", d=40)
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k, similarity=similarity,
                              reduction="none" if k in (3, 10) else "mean")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case,n,c,k,alpha,deterministic", [
    ("single_class", 9, 5, 3, None, True),
    ("absent_classes", 12, 11, 2, None, False),
    ("alpha_64", 19, 6, 10, 64.0, False),
    ("n_1_k_10", 1, 4, 10, 64.0, True),
    # 3 row tiles x 5 class tiles: splits on both sides, several programs per owner
    ("many_tiles", 70, 75, 2, None, False),
    ("many_tiles", 70, 75, 2, None, True),
])
def test_edge_cases(loss, case, n, c, k, alpha, deterministic, monkeypatch):
    monkeypatch.setattr(triton_linear, "DETERMINISTIC", deterministic)
    x, y, w = _inputs(n, c, k, torch.float32, "cpu", d=40, labels=_edge_labels(case, n, c))
    kw = {} if alpha is None else {"alpha": alpha}
    reduction = {"single_class": "none", "alpha_64": "sum", "n_1_k_10": "none"}.get(case, "mean")
    if loss == "mpa" and reduction == "sum":
        reduction = "mean"
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k, reduction=reduction,
                              **kw)


@pytest.mark.parametrize("fn", [F.proxy_anchor_loss, F.proxy_nca_loss])
@pytest.mark.parametrize("n,c", [(1, 3), (37, 9)])
def test_single_proxy_baselines(fn, n, c):
    x, y, w = _inputs(n, c, 1, torch.float32, "cpu", d=40)
    _assert_matches_reference(fn, x, y, w)


def _backend_call(x_hat, w_hat, y, spec, **kw):
    """The backend on normalised inputs, its terms reduced to the mean: (loss, dx_hat, dw_hat)."""
    x_hat = x_hat.detach().clone().requires_grad_()
    w_hat = w_hat.detach().clone().requires_grad_()
    value = F.reduce_terms(triton_linear.similarity_terms(x_hat, w_hat, y, spec, **kw), y, spec)
    value.backward()
    return value.detach(), x_hat.grad, w_hat.grad


@pytest.mark.parametrize("loss,k,similarity,deterministic", [
    ("mpa", 3, "softmax", False), ("mpa_dw", 2, "max", True), ("mpa_ap", 1, "softmax", False),
    ("soft_triple", 3, "mean", True),
])
def test_terms_take_labels_outside_the_classes(loss, k, similarity, deterministic):
    """The backend's terms and both gradients for a random gradient of the terms against the
    reference backend's, with labels outside [0, C) (a shard of the classes without the row's
    positive: every class is one of its negatives, its extra term is 0)."""
    n, c, d = 37, 40, 40
    x_hat, w_hat, _ = _clustered(n, c, k, d)
    y = torch.randint(0, c, (n,))
    y[::3] = torch.tensor([-1, c, c + 5, -7, 2 * c, c, -1, c, -2, c + 1, -1, 3 * c, c])
    spec = LossSpec(loss, c, k, 32.0, 0.1, similarity=similarity)
    grad = torch.rand(2, c if loss == "mpa" else n, generator=torch.Generator().manual_seed(2))
    got, want = [], []
    for backend, out, dtype in ((triton_linear, got, torch.float32),
                                (resolve("reference", torch.device("cpu")), want, torch.float64)):
        xh = x_hat.to(dtype).requires_grad_()
        wh = w_hat.to(dtype).requires_grad_()
        kw = {"deterministic": deterministic} if backend is triton_linear else {}
        terms = backend.similarity_terms(xh, wh, y, spec, **kw)
        out.extend([terms.detach(), *torch.autograd.grad(terms, (xh, wh), grad.to(dtype))])
    assert got[0].shape == want[0].shape
    if loss != "mpa":
        assert (got[0][1, ::3] == 0).all()
    for name, a, b in zip(("terms", "d_x_hat", "d_w_hat"), got, want):
        err = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0 if name == "terms"
                                                                           else 1e-6))
        assert err <= 2e-5, f"{name}: relative error {err:.2e}"


def _clustered(n, c, k, d, noise=0.5, group=8, spread=0.8, seed=0):
    """Embeddings near one of their class's proxies, as after some training, with the classes in
    groups of ``group`` related classes (proxies around a shared centre, ``spread`` apart): each
    sample has a few hard negatives and many far ones, so many class tiles have tiny softmax
    weights (what gradient filtering exploits)."""
    g = torch.Generator().manual_seed(seed)
    centres = tF.normalize(torch.randn(-(-c // group), d, generator=g), dim=1)
    w_hat = centres.repeat_interleave(group * k, 0)[: c * k]
    w_hat = tF.normalize(w_hat + spread * torch.randn(c * k, d, generator=g) / d ** 0.5, dim=1)
    y = torch.randint(0, c, (n,), generator=g)
    anchor = w_hat[y * k + torch.randint(0, k, (n,), generator=g)]
    x_hat = tF.normalize(anchor + noise * torch.randn(n, d, generator=g) / d ** 0.5, dim=1)
    return x_hat, w_hat, y


@pytest.mark.parametrize("loss", ["mpa", "mpa_dw"])
def test_deterministic_mode_is_bitwise_reproducible(loss):
    x_hat, w_hat, y = _clustered(70, 75, 2, 40)
    spec = LossSpec(loss, 75, 2, 32.0, 0.1)
    first = _backend_call(x_hat, w_hat, y, spec, deterministic=True)
    second = _backend_call(x_hat, w_hat, y, spec, deterministic=True)
    atomic = _backend_call(x_hat, w_hat, y, spec, deterministic=False)
    for a, b, c in zip(first, second, atomic):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_deterministic_default_follows_torch(monkeypatch):
    """``deterministic=None`` follows torch.use_deterministic_algorithms: two backward launches
    (a row-tile owner, then a class-tile owner) instead of one atomic launch."""
    owners = []
    launch = linear._launch_backward

    def spy(own_columns, *args):
        owners.append(own_columns)
        return launch(own_columns, *args)

    monkeypatch.setattr(linear, "_launch_backward", spy)
    x_hat, w_hat, y = _clustered(9, 5, 2, 16)
    spec = LossSpec("mpa_ap", 5, 2, 32.0, 0.1)
    _backend_call(x_hat, w_hat, y, spec)
    assert owners == [True]
    owners.clear()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _backend_call(x_hat, w_hat, y, spec)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert owners == [False, True]


def test_dw_chunks_match_one_launch(monkeypatch):
    """dw_hat in chunks of one class tile (a tiny DW_SCRATCH_BYTES) equals the one-launch result."""
    x_hat, w_hat, y = _clustered(37, 13, 3, 40)
    spec = LossSpec("mpa", 13, 3, 32.0, 0.1, similarity="softmax")
    whole = _backend_call(x_hat, w_hat, y, spec)
    monkeypatch.setattr(linear, "DW_SCRATCH_BYTES", 1)
    chunked = _backend_call(x_hat, w_hat, y, spec)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss,similarity,eps", [("mpa_dw", "softmax", 1e-3),
                                                 ("soft_triple", "mean", 1e-3),
                                                 ("mpa", "max", 7e-2)])
def test_gradient_filter(loss, similarity, eps):
    """On: the loss is untouched (the forward is exact) and every gradient entry is within the
    bound documented in mpa_kernels.kernels.linear, while the gradients do change (a third of
    the tiles are skipped in the row-wise cases, one in 24 for MPA), so the bound is really
    exercised. Off (filter_eps=0, the default) is the exact kernel: every tile passes a
    threshold of 0, which the equivalence tests above check against the reference."""
    n, c, k, d, alpha, gamma = 32, 384, 2, 64, 32.0, 0.1
    x_hat, w_hat, y = _clustered(n, c, k, d)
    spec = LossSpec(loss, c, k, alpha, 0.1, gamma, similarity)
    exact = _backend_call(x_hat, w_hat, y, spec, filter_eps=0.0)
    on = _backend_call(x_hat, w_hat, y, spec, filter_eps=eps)
    assert torch.equal(on[0], exact[0])
    assert not torch.equal(on[1], exact[1]) and not torch.equal(on[2], exact[2])
    # unit: g/N row-wise, g/|C+| column-wise; jac: the intra-class Jacobian's sum over k.
    unit = 1.0 / (len(torch.unique(y)) if loss == "mpa" else n)
    jac = 1.0 + 2.0 / gamma if similarity == "softmax" else 1.0
    per_entry = eps * alpha * unit * jac
    assert float((on[1] - exact[1]).abs().max()) <= per_entry * c
    assert float((on[2] - exact[2]).abs().max()) <= per_entry * n


def test_fp64_inputs_are_computed_in_fp32():
    x, y, w = _inputs(10, 5, 3, torch.float64, "cpu")
    got = _value_and_grads(F.mpa_loss, x, y, w, BACKEND, proxies_per_class=3)
    want = _value_and_grads(F.mpa_loss, x, y, w, "reference", proxies_per_class=3)
    assert all(t.dtype == torch.float64 for t in got)
    for a, b in zip(got, want):
        assert float((a - b).abs().max() / b.abs().max()) < 2e-5


def test_bad_options_and_too_many_proxies_are_clear_errors():
    x_hat, w_hat, y = _clustered(4, 3, 2, 16)
    spec = LossSpec("mpa", 3, 2, 32.0, 0.1)
    with pytest.raises(ValueError, match="filter_eps"):
        triton_linear.similarity_terms(x_hat, w_hat, y, spec, filter_eps=1.5)
    with pytest.raises(TypeError, match="filter_eps"):
        triton_linear.similarity_terms(x_hat, w_hat, y, spec, filter_eps="0.1")
    x, y, w = _inputs(4, 2, 17, torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match="up to 16 proxies per class, got 17"):
        F.mpa_loss(x, y, w, proxies_per_class=17, backend=BACKEND)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve(BACKEND, torch.device("cpu"))


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs only without CUDA")
def test_interpreter_is_available_on_cpu():
    assert resolve(BACKEND, torch.device("cpu")) is triton_linear


@pytest.mark.parametrize("loss,k,dtype,deterministic,allow_tf32", [
    ("mpa", 3, torch.float32, False, True), ("mpa_dw", 10, torch.float16, True, False),
    ("soft_triple", 1, torch.float32, True, False), ("mpa_ap", 2, torch.float16, False, False),
])
def test_launched_specialisations_are_the_checked_ones(monkeypatch, loss, k, dtype,
                                                        deterministic, allow_tf32):
    """What the launchers launch is in SPECIALISATIONS (what the compile check builds), with the
    argument types it declares; only the tiles differ under the interpreter."""
    launched = record_launches(monkeypatch)
    monkeypatch.setattr(triton_linear, "DETERMINISTIC", deterministic)
    monkeypatch.setattr(triton_linear, "ALLOW_TF32", allow_tf32)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(3 * k, 8, dtype=dtype, requires_grad=True)
    LOSSES[loss](x, torch.tensor([0, 1, 2, 1, 0]), w, proxies_per_class=k,
                 backend=BACKEND).backward()
    # forward, merge, then one backward launch (class-tile owner adding dx atomically) or two
    assert len(launched) == (4 if deterministic else 3)
    assert set(launched) <= {sp.name for sp in linear.SPECIALISATIONS}
    assert all(name.endswith("tf32]") == allow_tf32 for name in launched
               if not name.startswith("_merge_kernel"))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss,k,similarity,n,c,d,deterministic,reduction", _cases())
def test_matches_reference_cuda(dtype, loss, k, similarity, n, c, d, deterministic, reduction,
                                monkeypatch):
    monkeypatch.setattr(triton_linear, "DETERMINISTIC", deterministic)
    x, y, w = _inputs(n, c, k, dtype, "cuda", d)
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k, similarity=similarity,
                              reduction=reduction)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_reference_cuda_realistic(dtype, loss, deterministic, monkeypatch):
    """CUB-like and SOP-like shapes with d = 512: GPU tiles, many class tiles, chunks of d."""
    monkeypatch.setattr(triton_linear, "DETERMINISTIC", deterministic)
    for n, c, k in ((180, 100, 10), (256, 2000, 2)):
        x, y, w = _inputs(n, c, k, dtype, "cuda", d=512)
        _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k)


@requires_cuda
def test_deterministic_mode_is_bitwise_reproducible_cuda():
    x_hat, w_hat, y = (t.cuda() for t in _clustered(300, 3000, 4, 128))
    spec = LossSpec("mpa_dw", 3000, 4, 32.0, 0.1)
    first = _backend_call(x_hat.bfloat16(), w_hat.bfloat16(), y, spec, deterministic=True)
    second = _backend_call(x_hat.bfloat16(), w_hat.bfloat16(), y, spec, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss,similarity,k,deterministic", [("mpa", "softmax", 3, False),
                                                             ("mpa_dw", "max", 2, True)])
def test_opcheck(loss, similarity, k, deterministic):
    """Schema, fake (meta) kernels and autograd registration of the two custom operators."""
    n, c, d = 9, 4, 16
    x = tF.normalize(torch.randn(n, d), dim=1).requires_grad_()
    w = tF.normalize(torch.randn(c * k, d), dim=1).requires_grad_()
    labels = torch.randint(0, c, (n,))
    hyper = (loss, c, k, similarity, 32.0, 0.1, 0.1, deterministic, 0.0, False)
    torch.library.opcheck(torch.ops.mpa_kernels.linear_terms.default, (x, w, labels) + hyper)
    terms = torch.ops.mpa_kernels.linear_terms(x, w, labels, *hyper).detach()
    args = (torch.rand_like(terms), x.detach(), w.detach(), labels, terms) + hyper
    torch.library.opcheck(torch.ops.mpa_kernels.linear_terms_backward.default, args)


def test_compile_fullgraph_records_the_operators():
    spec = LossSpec("mpa_ap", 5, 2, 32.0, 0.1)

    def loss_fn(x, w, labels):
        return linear.fused_linear_terms(tF.normalize(x, dim=1), tF.normalize(w, dim=1), labels,
                                         spec, deterministic=False, allow_tf32=False).sum()

    x = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    labels = torch.randint(0, 5, (11,))
    assert_compiles_to_single_ops(loss_fn, x, w, labels, "linear_terms")
