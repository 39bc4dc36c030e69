"""The ``"triton"`` backend (kernels over the similarity tensor) against the reference.

Value and both gradients (embeddings and proxies, through the normalisation and the GEMM) through
the public functional API for every reduction, and the terms of the kernels alone on a given s
(each row of the terms with a gradient of its own, labels outside [0, C) included). On CPU the kernels run in the
Triton interpreter (conftest.py sets ``TRITON_INTERPRET=1``), so shapes are tiny: the full grid in
fp32, a subset in fp16 and bf16; on a GPU the grid runs on CUDA in fp32, fp16 and bf16.
The reference runs in fp64 on the very inputs the Triton backend sees (fp16/bf16-rounded for the
low-precision cases), so the tolerances measure the backend's own error.
"""

import itertools

import pytest
import torch

import mpa_kernels.functional as F
from mpa_kernels._spec import LossSpec
from mpa_kernels.backends import BackendUnavailableError, resolve
from mpa_kernels.backends import reference as reference_backend
from mpa_kernels.kernels.similarity import similarity_terms
from tests.conftest import HAS_CUDA, requires_cuda

LOSSES = {
    "mpa": F.mpa_loss,
    "mpa_dw": F.mpa_dw_loss,
    "mpa_ap": F.mpa_ap_loss,
    "soft_triple": F.soft_triple_loss,
}
SIMILARITIES = ("softmax", "max", "mean")
KS = (1, 2, 3, 10)
# The odd-shape grid: N = 1, N not a multiple of the 16-row block, C not a power of two.
SHAPES = ((1, 3), (17, 7), (33, 13), (5, 11))
# Relative error bounds (max |diff| / max |reference|) through the public API: fp32 is exact up to
# rounding; with fp16/bf16 the normalisation, both GEMMs, s and ds are rounded to 11/8 significant
# bits, and the gradients of the embeddings (a projection of ds @ w_hat) lose a few more to
# cancellation (1.5e-2 is the worst fp16 case seen over the fp32 grid's cases).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-2, torch.bfloat16: 2e-1}
# The kernels alone, on a given s: fp32 arithmetic, then ds rounded to the dtype of s.
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


REDUCTIONS = ("mean", "none", "sum")


def _cases():
    """Every loss x K x similarity (one similarity for K = 1, where all modes agree), each with a
    shape from the grid and a reduction in turn, so that both are covered without their full
    product ("sum" is refused for the column-wise MPA: "mean" instead)."""
    combos = [(loss, k, sim) for loss, k, sim in itertools.product(LOSSES, KS, SIMILARITIES)
              if k > 1 or sim == "softmax"]
    cases = []
    for i, (loss, k, sim) in enumerate(combos):
        reduction = REDUCTIONS[i % len(REDUCTIONS)]
        if loss == "mpa" and reduction == "sum":
            reduction = "mean"
        cases.append((loss, k, sim, *SHAPES[i % len(SHAPES)], reduction))
    return cases


def _inputs(n, c, k, dtype, device, d=8, labels=None):
    x = torch.randn(n, d, device=device).to(dtype)
    w = torch.randn(c * k, d, device=device).to(dtype)
    y = torch.randint(0, c, (n,), device=device) if labels is None else labels.to(device)
    return x, y, w


def _value_and_grads(fn, x, y, w, backend, reduction="mean", **kw):
    """The loss and both gradients; for ``reduction="none"`` the gradient of a weighted sum of the
    terms, with unequal weights so that each term's own gradient counts."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    value = fn(x, y, w, backend=backend, reduction=reduction, **kw)
    weights = torch.linspace(0.5, 2.0, value.numel(), dtype=value.dtype, device=value.device)
    (value * weights.view(value.shape)).sum().backward()
    return value.detach(), x.grad, w.grad


def _relative_errors(got, want):
    """max |got - want| / max |want| for the loss and both gradients. A loss near 0 is a difference
    of terms of size ~alpha (SoftTriple's lse - z_y): its error is measured against 1 instead."""
    errors = []
    for name, a, b in zip(("loss", "d_embeddings", "d_proxies"), got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        scale = b.abs().max().clamp_min(1.0 if name == "loss" else 1e-30)
        errors.append(float((a.double() - b).abs().max() / scale))
    return errors


def _assert_matches_reference(fn, x, y, w, **kw):
    """Triton on (x, w) against the fp64 reference on the same values.

    The bound is TOLERANCE[dtype] plus 10x the error of the reference itself run in fp32: a loss
    whose softmax is saturated has gradients that are differences of nearly equal terms, and no
    fp32 computation gets those to 2e-5 (the fp32 reference does not either).
    """
    got = _value_and_grads(fn, x, y, w, "triton", **kw)
    want = _value_and_grads(fn, x.double(), y, w.double(), "reference", **kw)
    ref32 = _value_and_grads(fn, x.float(), y, w.float(), "reference", **kw)
    assert got[1].dtype == x.dtype and got[2].dtype == w.dtype
    errors = _relative_errors(got, want)
    for name, err, ref_err in zip(("loss", "d_embeddings", "d_proxies"), errors,
                                  _relative_errors(ref32, want)):
        bound = TOLERANCE[x.dtype] + 10 * ref_err
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.2e}"
    return errors


@pytest.mark.parametrize("loss,k,similarity,n,c,reduction", _cases())
def test_matches_reference_fp32(loss, k, similarity, n, c, reduction):
    x, y, w = _inputs(n, c, k, torch.float32, "cpu")
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k, similarity=similarity,
                              reduction=reduction)


@pytest.mark.parametrize("loss,k,similarity", [
    (loss, k, sim) for loss in LOSSES for k, sim in ((1, "softmax"), (3, "max"), (10, "softmax"),
                                                     (2, "mean"))
])
def test_matches_reference_fp16(loss, k, similarity):
    x, y, w = _inputs(17, 7, k, torch.float16, "cpu")
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k, similarity=similarity,
                              reduction="none" if k in (3, 10) else "mean")


@pytest.mark.parametrize("loss", LOSSES)
def test_matches_reference_bf16(loss):
    x, y, w = _inputs(17, 7, 3, torch.bfloat16, "cpu")
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=3)


def _class_similarity_of_s(s, k, similarity, gamma=0.1):
    """Eq. 1 and its alternatives on a given s (the reference starts from embeddings)."""
    s = s.view(s.shape[0], -1, k)
    if similarity == "softmax":
        return (torch.softmax(s / gamma, dim=2) * s).sum(dim=2)
    return s.max(dim=2).values if similarity == "max" else s.mean(dim=2)


def _assert_kernels_match_reference(s, labels, loss, c, k, similarity, alpha=32.0, delta=0.1):
    """The custom operator on s (the terms and ds for a random gradient of both rows of the
    terms) against the reference backend's terms of s in fp64: isolates the kernels' own error
    from that of the GEMMs and the normalisation."""
    s = s.detach().requires_grad_()
    terms = similarity_terms(s, labels, loss, c, k, similarity, alpha, delta, 0.1)
    grad = torch.rand(terms.shape, generator=torch.Generator().manual_seed(1)).to(terms.device)
    (ds,) = torch.autograd.grad(terms, s, grad)
    s64 = s.detach().double().requires_grad_()
    spec = LossSpec(loss, c, k, alpha, delta, 0.1, similarity)
    want = reference_backend.terms_of_class_similarity(
        _class_similarity_of_s(s64, k, similarity), labels, spec)
    (ds_want,) = torch.autograd.grad(want, s64, grad.double())
    assert terms.dtype == torch.float32 and ds.dtype == s.dtype and terms.shape == want.shape
    tol = KERNEL_TOLERANCE[s.dtype]
    terms, want = terms.detach().double(), want.detach()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(terms), finite) and (terms[~finite] == want[~finite]).all()
    err_terms = float(((terms - want)[finite].abs() / want[finite].abs().clamp_min(1.0)).max())
    err_ds = float((ds.double() - ds_want).abs().max() / ds_want.abs().max())
    assert err_terms <= tol and err_ds <= tol, (err_terms, err_ds)
    return err_terms, err_ds


# bf16 runs in the interpreter here: these kernels only load, convert and store it (no tl.dot, which
# is what the interpreter gets wrong in bf16).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss,k,similarity", [
    ("mpa", 10, "softmax"), ("mpa_dw", 3, "max"), ("mpa_ap", 2, "mean"), ("soft_triple", 10, "softmax"),
])
def test_kernels_alone_match_reference(dtype, loss, k, similarity):
    n, c = 21, 9
    s = (torch.rand(n, c * k) * 2 - 1).to(dtype)
    labels = torch.randint(0, c, (n,))
    _assert_kernels_match_reference(s, labels, loss, c, k, similarity)


@pytest.mark.parametrize("loss,k,similarity", [
    ("mpa", 3, "softmax"), ("mpa_dw", 2, "max"), ("mpa_ap", 1, "softmax"),
    ("soft_triple", 3, "mean"),
])
def test_kernels_take_labels_outside_the_classes(loss, k, similarity):
    """Labels outside [0, C) (a shard of the classes without the row's positive): no class is
    positive for that row, and its extra term is 0. Across several class blocks and splits."""
    n, c = 19, 70
    s = torch.rand(n, c * k) * 2 - 1
    labels = torch.randint(0, c, (n,))
    labels[::3] = torch.tensor([-1, c, c + 5, -7, 2 * c, c, -1])
    _assert_kernels_match_reference(s, labels, loss, c, k, similarity)
    if loss != "mpa":
        terms = similarity_terms(s, labels, loss, c, k, similarity, 32.0, 0.1, 0.1)
        assert (terms[1, ::3] == 0).all()


def _edge_labels(case, n, c):
    if case == "single_class":
        return torch.full((n,), c - 2)
    if case == "absent_classes":  # only 3 of the c classes appear in the batch
        return torch.arange(n) % 3
    return torch.randint(0, c, (n,))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case,n,c,k,alpha", [
    ("single_class", 9, 5, 3, None),
    ("absent_classes", 12, 11, 2, None),
    ("alpha_64", 19, 6, 10, 64.0),
    ("n_1_k_10", 1, 4, 10, 64.0),
    # several class blocks (BLOCK_C = 64 at K = 2) and rows split across programs
    ("many_classes", 40, 150, 2, None),
])
def test_edge_cases(loss, case, n, c, k, alpha):
    x, y, w = _inputs(n, c, k, torch.float32, "cpu", labels=_edge_labels(case, n, c))
    kw = {} if alpha is None else {"alpha": alpha}
    reduction = {"single_class": "none", "alpha_64": "sum", "n_1_k_10": "none"}.get(case, "mean")
    if loss == "mpa" and reduction == "sum":
        reduction = "mean"
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k, reduction=reduction,
                              **kw)


@pytest.mark.parametrize("loss,n,c", [("mpa", 6, 1100), ("soft_triple", 1030, 3)])
def test_terms_span_several_merge_blocks(loss, n, c):
    """More classes (column-wise) or rows (row-wise) than the merge kernel's 1024-wide block."""
    x, y, w = _inputs(n, c, 1, torch.float32, "cpu")
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=1, reduction="none")


@pytest.mark.parametrize("fn", [F.proxy_anchor_loss, F.proxy_nca_loss])
@pytest.mark.parametrize("n,c", [(1, 3), (21, 9)])
def test_single_proxy_baselines(fn, n, c):
    x, y, w = _inputs(n, c, 1, torch.float32, "cpu")
    _assert_matches_reference(fn, x, y, w)


def test_fp64_inputs_are_computed_in_fp32():
    x, y, w = _inputs(10, 5, 3, torch.float64, "cpu")
    got = _value_and_grads(F.mpa_loss, x, y, w, "triton", proxies_per_class=3)
    want = _value_and_grads(F.mpa_loss, x, y, w, "reference", proxies_per_class=3)
    assert all(t.dtype == torch.float64 for t in got)
    for a, b in zip(got, want):
        assert float((a - b).abs().max() / b.abs().max()) < 2e-5


def test_too_many_proxies_per_class_is_a_clear_error():
    x, y, w = _inputs(4, 2, 33, torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match="up to 32 proxies per class, got 33"):
        F.mpa_loss(x, y, w, proxies_per_class=33, backend="triton")
    # "auto" never lands on a backend that refuses the loss.
    assert F.mpa_loss(x, y, w, proxies_per_class=33).isfinite()


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve("triton", torch.device("cpu"))


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs only without CUDA")
def test_interpreter_is_available_on_cpu():
    assert resolve("triton", torch.device("cpu")).__name__.endswith("triton_s")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss,k,similarity,n,c,reduction", _cases())
def test_matches_reference_cuda(dtype, loss, k, similarity, n, c, reduction):
    x, y, w = _inputs(n, c, k, dtype, "cuda")
    _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k, similarity=similarity,
                              reduction=reduction)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss,k,similarity", [
    ("mpa", 10, "softmax"), ("mpa_dw", 3, "max"), ("mpa_ap", 2, "mean"), ("soft_triple", 10, "softmax"),
])
def test_kernels_alone_match_reference_cuda(dtype, loss, k, similarity):
    n, c = 300, 1000
    s = (torch.rand(n, c * k, device="cuda") * 2 - 1).to(dtype)
    labels = torch.randint(0, c, (n,), device="cuda")
    _assert_kernels_match_reference(s, labels, loss, c, k, similarity)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_reference_cuda_realistic(dtype, loss):
    """CUB-like and SOP-like shapes: many class blocks and forward splits."""
    for n, c, k in ((180, 100, 10), (256, 2000, 2)):
        x, y, w = _inputs(n, c, k, dtype, "cuda", d=64)
        _assert_matches_reference(LOSSES[loss], x, y, w, proxies_per_class=k)
