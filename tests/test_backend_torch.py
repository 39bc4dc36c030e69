"""The chunked CPU backend (``backend="torch"``) against the reference backend.

Every loss, every similarity mode, the odd-shape grid (N = 1, C not a power of two, K in
{1, 2, 3, 10}, absent classes), and chunk budgets small enough that the class sweep runs in many
chunks (one class per chunk, and two with a ragged last one); the tests that run with the default
budget cover the single-chunk case. Through the API the backend gets
raw proxies (``proxy_loss``: normalisation and regulariser fused into its sweep), so the proxies
are given norms far from one; ``similarity_loss`` (unit proxies) is checked on its own. The
unreduced terms (``proxy_terms``, ``similarity_terms``) are checked against a plain computation of
the contract under random upstream gradients, and through the front end's other reductions.
"""

import pytest
import torch
import torch.nn.functional as F

from mpa_kernels import functional as MF
from mpa_kernels import reference
from mpa_kernels._spec import LossSpec
from mpa_kernels.backends import resolve
from mpa_kernels.backends import _native, torch_chunked
from mpa_kernels.parallel import LOSS_CLASSES

MULTI_PROXY = {
    "mpa": MF.mpa_loss,
    "mpa_dw": MF.mpa_dw_loss,
    "mpa_ap": MF.mpa_ap_loss,
    "soft_triple": MF.soft_triple_loss,
}
ONE_PROXY = {"proxy_anchor": MF.proxy_anchor_loss, "proxy_nca": MF.proxy_nca_loss}

# (N, C, K, labels): labels "random" over all classes, "subset" over the first C // 2 only (absent
# classes), "single" all one class.
SHAPES = {
    "n1": (1, 3, 2, "random"),
    "odd": (13, 7, 3, "random"),
    "k10_absent": (9, 11, 10, "subset"),
    "k1": (10, 5, 1, "random"),
    "single_class": (6, 5, 2, "single"),
}
# Classes per chunk: one, and two (a ragged last chunk where C is odd).
CLASSES_PER_CHUNK = [1, 2]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
D = 16


@pytest.fixture(autouse=True, params=["native", "eager"])
def chunk_loops(request, monkeypatch):
    """Every test twice: the chunks' work between the GEMMs in the native loops, and in the eager
    ops that stand in for them where the loops cannot be built."""
    if request.param == "native" and _native.module() is None:
        pytest.skip(f"the native loops are not available here: {_native.status()}")
    monkeypatch.setattr(torch_chunked, "NATIVE", request.param == "native")
    return request.param


def _labels(n, c, kind, gen):
    if kind == "single":
        return torch.full((n,), c - 2, dtype=torch.long)
    if kind == "outside":  # some in [0, C), some below and above it
        labels = torch.randint(-2, c + 2, (n,), generator=gen)
        assert ((labels < 0) | (labels >= c)).any() and ((labels >= 0) & (labels < c)).any()
        return labels
    high = max(1, c // 2) if kind == "subset" else c
    return torch.randint(0, high, (n,), generator=gen)


def _inputs(n, c, k, kind, dtype, seed=0, d=D):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(c * k, d, generator=gen, dtype=torch.float64)
    # Row norms spread over 0.1 .. 10 (log-uniform), so that the normalisation matters.
    w = w * torch.exp(torch.empty(c * k, 1, dtype=torch.float64).uniform_(-2.3, 2.3, generator=gen))
    return x, _labels(n, c, kind, gen), w.to(dtype).requires_grad_()


def _value_and_grads(fn, x, y, w, backend, **kwargs):
    loss = fn(x, y, w, backend=backend, **kwargs)
    gx, gw = torch.autograd.grad(loss, [x, w])
    return loss.detach(), gx, gw


def _assert_matches(got, want, tol):
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * float(r.abs().max()))


def _chunk_classes(monkeypatch, classes, n, k):
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", classes * n * k)


# The regulariser on and off, each with one of the chunkings (it is summed chunk by chunk, so the
# multi-class ragged chunks are the ones to check it with).
@pytest.mark.parametrize("classes_per_chunk, tau", [(1, 0.0), (2, 0.2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("similarity", ["softmax", "max", "mean"])
@pytest.mark.parametrize("loss", list(MULTI_PROXY))
def test_multi_proxy_matches_reference(loss, similarity, shape, dtype, classes_per_chunk, tau,
                                       monkeypatch):
    n, c, k, kind = SHAPES[shape]
    _chunk_classes(monkeypatch, classes_per_chunk, n, 1 if similarity == "mean" else k)
    x, y, w = _inputs(n, c, k, kind, dtype)
    kwargs = dict(proxies_per_class=k, similarity=similarity, tau=tau)
    got = _value_and_grads(MULTI_PROXY[loss], x, y, w, "torch", **kwargs)
    want = _value_and_grads(MULTI_PROXY[loss], x, y, w, "reference", **kwargs)
    _assert_matches(got, want, TOLERANCE[dtype])


@pytest.mark.parametrize("classes_per_chunk", CLASSES_PER_CHUNK)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", ["n1", "odd", "k10_absent", "single_class"])
@pytest.mark.parametrize("loss", list(ONE_PROXY))
def test_one_proxy_matches_reference(loss, shape, dtype, classes_per_chunk, monkeypatch):
    n, c, _, kind = SHAPES[shape]
    _chunk_classes(monkeypatch, classes_per_chunk, n, 1)
    x, y, w = _inputs(n, c, 1, kind, dtype)
    got = _value_and_grads(ONE_PROXY[loss], x, y, w, "torch")
    want = _value_and_grads(ONE_PROXY[loss], x, y, w, "reference")
    _assert_matches(got, want, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("loss", list(MULTI_PROXY))
def test_small_gamma_needs_the_max_shift(loss, dtype, monkeypatch):
    """gamma = 0.01 puts e^(s / gamma) out of fp32's range (not fp64's), so the intra-class softmax
    subtracts its max in fp32 and not in fp64; both must match the reference."""
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 40)
    x, y, w = _inputs(11, 6, 3, "random", dtype)
    kwargs = dict(proxies_per_class=3, gamma=0.01)
    got = _value_and_grads(MULTI_PROXY[loss], x, y, w, "torch", **kwargs)
    want = _value_and_grads(MULTI_PROXY[loss], x, y, w, "reference", **kwargs)
    _assert_matches(got, want, TOLERANCE[dtype])


def test_mpa_dw_positive_term_past_softplus_threshold(monkeypatch):
    """Samples at cosine -0.57 to their proxy put MPA-DW's positive logit -alpha (S - delta) just
    past F.softplus's threshold of 20, where softplus is linear and its gradient exactly 1, not
    sigmoid = 1 - e^-21 (a 1e-9 difference)."""
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 2 * 13)
    _, y, w = _inputs(13, 7, 1, "random", torch.float64)
    gen = torch.Generator().manual_seed(3)
    u = F.normalize(w.detach()[y], dim=1)
    v = torch.randn(13, D, generator=gen, dtype=torch.float64)
    v = F.normalize(v - u * (u * v).sum(1, keepdim=True), dim=1)
    x = (-0.57 * u + 0.82 * v).requires_grad_()
    got = _value_and_grads(MF.mpa_dw_loss, x, y, w, "torch", proxies_per_class=1)
    want = _value_and_grads(MF.mpa_dw_loss, x, y, w, "reference", proxies_per_class=1)
    _assert_matches(got, want, 1e-10)


@pytest.mark.parametrize("similarity", ["softmax", "max", "mean"])
@pytest.mark.parametrize("loss", ["mpa", "mpa_dw", "mpa_ap", "soft_triple"])
def test_zero_proxy_row(loss, similarity, monkeypatch):
    """A proxy of norm 0 is clamped as F.normalize does (its unit row is 0, its gradient g / eps);
    the regulariser's pairs with it sit at distance sqrt(2). The gradients are compared with the
    front end's unfused path on this backend (unit_rows, similarity_loss, the regulariser); the
    value is the reference's."""
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 2 * 13 * 3)
    x, y, w = _inputs(13, 7, 3, "random", torch.float64)
    w = w.detach().index_fill_(0, torch.tensor([int(y[0]) * 3 + 1]), 0.0).requires_grad_()
    tau = 0.2
    # validate=False: the value checks refuse a zero row; past them it is computed as described.
    got = _value_and_grads(MULTI_PROXY[loss], x, y, w, "torch", proxies_per_class=3,
                           similarity=similarity, tau=tau, validate=False)
    reference = MULTI_PROXY[loss](x, y, w, proxies_per_class=3, similarity=similarity, tau=tau,
                                  backend="reference", validate=False)
    spec = LossSpec(loss, 7, 3, 20.0 if loss == "soft_triple" else 32.0,
                    0.01 if loss == "soft_triple" else 0.1, 0.1, similarity)
    w_hat = MF.unit_rows(w)
    unfused = (torch_chunked.similarity_loss(MF.unit_rows(x), w_hat, y, spec)
               + tau * MF.unit_proxy_regularizer(w_hat, 3))
    want = (reference.detach(), *torch.autograd.grad(unfused, [x, w]))
    assert got[2].abs().max() > 1e9  # the zero row's gradient is there, scaled by 1 / eps
    _assert_matches(got, want, 1e-10)


@pytest.mark.parametrize("similarity", ["softmax", "max", "mean"])
@pytest.mark.parametrize("loss", ["mpa", "mpa_dw", "mpa_ap", "soft_triple", "proxy_nca"])
def test_gradcheck_proxy_loss(loss, similarity):
    """float64 gradcheck of the whole fused loss (regulariser included) in x_hat and the raw
    proxies, one class per chunk."""
    n, c, k = (5, 4, 1) if loss == "proxy_nca" else (5, 4, 3)
    x, y, w = _inputs(n, c, k, "random", torch.float64, seed=2)
    x_hat = F.normalize(x.detach(), dim=1).requires_grad_()
    spec = LossSpec(loss, c, k, 20.0 if loss == "proxy_nca" else 8.0, 0.1, 0.2, similarity)

    def f(xh, wr):
        return torch_chunked.proxy_loss(xh, wr, y, spec, 0.3, chunk_elements=1)

    assert torch.autograd.gradcheck(f, (x_hat, w.detach().requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("similarity", ["softmax", "max", "mean"])
@pytest.mark.parametrize("loss", ["mpa", "mpa_dw", "mpa_ap", "soft_triple", "proxy_nca"])
def test_gradcheck(loss, similarity):
    """float64 gradcheck of the autograd.Function (and the mean mode's averaging in front of it),
    one class per chunk."""
    n, c, k = (5, 4, 1) if loss == "proxy_nca" else (5, 4, 3)
    x, y, w = _inputs(n, c, k, "random", torch.float64, seed=1)
    x_hat = F.normalize(x.detach(), dim=1).requires_grad_()
    w_hat = F.normalize(w.detach(), dim=1).requires_grad_()
    spec = LossSpec(loss, c, k, 20.0 if loss == "proxy_nca" else 8.0, 0.1, 0.2, similarity)

    def f(xh, wh):
        return torch_chunked.similarity_loss(xh, wh, y, spec, chunk_elements=1)

    assert torch.autograd.gradcheck(f, (x_hat, w_hat), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("loss", ["mpa", "mpa_ap"])
def test_half_inputs_get_gradients_in_their_dtype(loss, dtype):
    x, y, w = _inputs(9, 7, 3, "random", dtype)
    got = _value_and_grads(MULTI_PROXY[loss], x, y, w, "torch", proxies_per_class=3)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    x32, w32 = (t.detach().float().requires_grad_() for t in (x, w))
    want = _value_and_grads(MULTI_PROXY[loss], x32, y, w32, "reference", proxies_per_class=3)
    _assert_matches([got[0]], [want[0]], 1e-5)
    # The fp32 gradients agree to ~1e-7 and are then rounded to the input dtype: one ulp apart.
    eps = torch.finfo(dtype).eps
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), r, rtol=eps, atol=eps * float(r.abs().max()))


@pytest.mark.parametrize("loss", ["mpa", "mpa_dw"])
def test_grad_output_scale_and_one_sided_gradients(loss, monkeypatch):
    """A loss scaled before backward, and gradients asked for one input at a time (the column-wise
    forward writes only the gradients that are wanted; the row-wise backward only those asked)."""
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 40)
    x, y, w = _inputs(13, 7, 3, "random", torch.float64)
    fn = MULTI_PROXY[loss]
    want = _value_and_grads(fn, x, y, w, "reference", proxies_per_class=3)
    (gx,) = torch.autograd.grad(3.5 * fn(x, y, w.detach(), proxies_per_class=3, backend="torch"),
                                [x])
    (gw,) = torch.autograd.grad(-2.0 * fn(x.detach(), y, w, proxies_per_class=3, backend="torch"),
                                [w])
    _assert_matches([gx / 3.5, gw / -2.0], want[1:], 1e-10)


def test_no_grad_value(monkeypatch):
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 40)
    x, y, w = _inputs(13, 7, 3, "random", torch.float64)
    for fn in MULTI_PROXY.values():
        with torch.no_grad():
            got = fn(x, y, w, proxies_per_class=3, backend="torch")
            want = fn(x, y, w, proxies_per_class=3, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_auto_picks_torch_on_cpu():
    assert resolve("auto", torch.device("cpu")) is torch_chunked


def test_bad_chunk_budget():
    x, y, w = _inputs(3, 4, 2, "random", torch.float32)
    spec = LossSpec("mpa", 4, 2, 32.0, 0.1)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="chunk_elements"):
            torch_chunked.similarity_loss(F.normalize(x, dim=1), F.normalize(w, dim=1), y, spec,
                                          chunk_elements=bad)


def _peak_bytes(fn):
    """Peak bytes torch's CPU allocator holds while fn() runs, above what was live before."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _memory_case(d, monkeypatch):
    """N, C, K and the inputs of the memory tests, swept in 16 chunks of 128 classes; the row-wise
    losses in blocks of 4 rows (they keep 4 rows' J, a sixteenth of N x C*K)."""
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 32768)
    n, c, k = 64, 2048, 4
    monkeypatch.setattr(torch_chunked, "ROW_BLOCK_BYTES", 4 * c * (k + 2) * 4)
    monkeypatch.setattr(torch_chunked, "MIN_BLOCK_ROWS", 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    w = torch.randn(c * k, d, generator=gen, requires_grad=True)
    return (n, c, k), (x, torch.randint(0, c, (n,), generator=gen), w)


@pytest.mark.parametrize("loss", ["mpa", "mpa_dw"])
def test_memory_does_not_grow_with_n_c_k(loss, monkeypatch):
    """Forward and backward hold far less than one N x C*K tensor beyond the inputs' copies and
    gradients, where the reference holds several. A narrow d keeps those copies small next to s."""
    (n, c, k), (x, y, w) = _memory_case(2, monkeypatch)
    s_bytes = n * c * k * 4

    def run(backend):
        return lambda: MULTI_PROXY[loss](x, y, w, proxies_per_class=k, backend=backend).backward()

    assert _peak_bytes(run("reference")) > 2 * s_bytes
    assert _peak_bytes(run("torch")) < s_bytes / 2


@pytest.mark.parametrize("loss", ["mpa_dw", "soft_triple"])
def test_row_wise_keeps_its_rows_in_the_gradient(loss, monkeypatch):
    """Where N (K + 2) <= K d, a row-wise loss's mean keeps every row's J, logits and 1/Z in the
    proxies' gradient buffer between its two visits: beyond the gradients, a quarter of the
    N x C x (K + 2) numbers it keeps at most (what remains is the chunks' buffers)."""
    (n, c, k), (x, y, w) = _memory_case(96, monkeypatch)  # 64 * 6 <= 4 * 96
    monkeypatch.setattr(torch_chunked, "ROW_BLOCK_BYTES", 1 << 40)  # one block, were it a buffer
    chosen = _set_row_regime(monkeypatch, "gradient", 1)
    grads_bytes = (n + c * k) * x.shape[1] * 4
    peak = _peak_bytes(lambda: MULTI_PROXY[loss](x, y, w, proxies_per_class=k, tau=0.2,
                                                 backend="torch", validate=False).backward())
    assert chosen == [(n, "gradient")]
    assert peak - grads_bytes < n * c * (k + 2) * 4 / 4


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ["mpa", "mpa_dw"])
def test_memory_has_no_proxy_sized_temporary(loss, reduction, monkeypatch):
    """Through the API (raw proxies, regulariser on), forward and backward hold, beyond the
    gradients they return, well under one proxy-sized (C*K*d) plus one N x C*K tensor: the proxies'
    normalisation, the regulariser and their gradients are done chunk by chunk, for the mean and
    for the terms (whose backward recomputes the chunks)."""
    d = 64
    (n, c, k), (x, y, w) = _memory_case(d, monkeypatch)
    grads_bytes = (n + c * k) * d * 4
    budget = (c * k * d + n * c * k) * 4

    def extra_peak(backend):
        x.grad = w.grad = None  # freed before, not during, the measured call
        # validate=False: the front end's input checks make temporaries of their own.
        peak = _peak_bytes(lambda: MULTI_PROXY[loss](
            x, y, w, proxies_per_class=k, tau=0.2, backend=backend, validate=False,
            reduction=reduction).sum().backward())
        return peak - grads_bytes

    assert extra_peak("reference") > budget
    assert extra_peak("torch") < budget / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_proxies_of_a_class_have_finite_regulariser_gradients(dtype):
    # Found in training: two proxies of a class that coincide. In fp32, 2 + 1e-12 rounds to 2, so
    # the regulariser's distance must be formed as 2 (1 - m) + eps to stay above zero.
    torch.manual_seed(3)
    x = torch.randn(8, 6, dtype=dtype)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    w = torch.randn(12, 6, dtype=dtype)
    w[4] = w[5] = torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0, 0.0])  # class 1: proxies 0 and 1 coincide
    grads = []
    for backend in ("torch", "reference"):
        p = w.clone().requires_grad_(True)
        value = MF.soft_triple_loss(x, labels, p, proxies_per_class=4, tau=0.2, backend=backend)
        grads.append(torch.autograd.grad(value, p)[0])
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5,
                               atol=1e-5 * grads[1].abs().max().item())


@pytest.mark.parametrize("loss", ["mpa_dw", "soft_triple"])
def test_row_wise_keeps_no_regularizer_matrices(loss, monkeypatch):
    """With many proxies per class in few dimensions, C*K*K numbers (the regulariser's K x K
    matrices of every class) outweigh the proxies themselves; the row-wise sweep forms them chunk
    by chunk and keeps none."""
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 8192)
    monkeypatch.setattr(torch_chunked, "ROW_BLOCK_BYTES", 1 << 16)
    monkeypatch.setattr(torch_chunked, "MIN_BLOCK_ROWS", 1)
    n, c, k, d = 32, 1024, 16, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    w = torch.randn(c * k, d, generator=gen, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=gen)
    grads_bytes = (n + c * k) * d * 4
    peak = _peak_bytes(lambda: MULTI_PROXY[loss](x, y, w, proxies_per_class=k, tau=0.2,
                                                 backend="torch", validate=False).backward())
    assert peak - grads_bytes < c * k * k * 4 / 2


# The row-wise losses' four regimes, as (rows that ROW_BLOCK_BYTES holds, MIN_BLOCK_ROWS,
# KEEP_IN_GRADIENT): every row in one block that keeps what its second visit needs in the proxies'
# gradient buffer (the default where it fits, as at d = 32 here), or in a buffer of its own (where
# it does not), blocks of a few rows, and one block that keeps nothing and recomputes.
ROW_REGIMES = {
    "gradient": (1 << 20, 1, True),
    "buffer": (1 << 20, 1, False),
    "blocks": (4, 1, False),
    "recompute": (4, 1 << 30, False),
}


def _set_row_regime(monkeypatch, regime, row_bytes):
    """Sets the regime's constants for rows of row_bytes kept bytes (C classes times the numbers
    kept per row and class, fp64), and returns the list of (rows, keep) the sweeps choose."""
    rows, min_rows, in_gradient = ROW_REGIMES[regime]
    monkeypatch.setattr(torch_chunked, "ROW_BLOCK_BYTES", rows * row_bytes)
    monkeypatch.setattr(torch_chunked, "MIN_BLOCK_ROWS", min_rows)
    monkeypatch.setattr(torch_chunked, "KEEP_IN_GRADIENT", in_gradient)
    chosen = _Chosen()
    choose = torch_chunked._row_blocks

    def spy(*args):
        rows, keep, kept = choose(*args)
        chosen.append((rows, keep))
        chosen.kept.append(kept)
        return rows, keep, kept

    monkeypatch.setattr(torch_chunked, "_row_blocks", spy)
    return chosen


class _Chosen(list):
    """(rows, keep) of each row-wise sweep, and in .kept what it kept of each chunk."""

    def __init__(self):
        super().__init__()
        self.kept = []


def _assert_regime(chosen, regime, n):
    keep = {"gradient": "gradient", "buffer": "buffer", "blocks": "buffer", "recompute": None}
    assert chosen and all(k == keep[regime] for _, k in chosen), chosen
    assert all((rows < n) == (regime == "blocks") for rows, _ in chosen), chosen


# In the gradient regime the width decides what else is kept (for the softmax at the odd shape,
# N = 13, K = 3: d = 32 J, logits and 1/Z; 36 the GEMM's output too; 48 and the Gram matrices).
REGIME_WIDTHS = [("gradient", 32), ("gradient", 36), ("gradient", 48), ("buffer", 32),
                 ("blocks", 32), ("recompute", 32)]


@pytest.mark.parametrize("regime, d", REGIME_WIDTHS)
@pytest.mark.parametrize("similarity", ["softmax", "max", "mean"])
@pytest.mark.parametrize("loss", ["mpa_dw", "mpa_ap", "soft_triple"])
def test_row_wise_regimes_match_reference(loss, similarity, regime, d, monkeypatch):
    n, c, k, kind = SHAPES["odd"]
    kept = {"softmax": k + 2, "max": k + 1, "mean": 1}[similarity]  # J, the logit, 1/Z
    chosen = _set_row_regime(monkeypatch, regime, c * kept * 8)
    _chunk_classes(monkeypatch, 2, n, k)
    x, y, w = _inputs(n, c, k, kind, torch.float64, d=d)
    kwargs = dict(proxies_per_class=k, similarity=similarity, tau=0.2)
    got = _value_and_grads(MULTI_PROXY[loss], x, y, w, "torch", **kwargs)
    want = _value_and_grads(MULTI_PROXY[loss], x, y, w, "reference", **kwargs)
    _assert_matches(got, want, 1e-10)
    _assert_regime(chosen, regime, n)


@pytest.mark.parametrize("tau", [0.2, 0.0])
def test_gradient_regime_keeps_what_fits(tau, monkeypatch):
    """Beyond J, the logits and 1/Z (N (K + 2) numbers per class), the GEMM's output (N K more)
    where it fits in K d, and then the Gram matrices (K^2 more) where there is a regulariser."""
    chosen = _set_row_regime(monkeypatch, "gradient", 1)
    n, c, k, _ = SHAPES["odd"]
    for d in (32, 36, 48):
        x, y, w = _inputs(n, c, k, "random", torch.float64, d=d)
        MF.mpa_dw_loss(x, y, w, proxies_per_class=k, tau=tau, backend="torch").backward()
    assert list(chosen) == [(n, "gradient")] * 3
    assert [(kept.j, kept.inv_z, kept.raw, kept.gram) for kept in chosen.kept] == [
        (k, 1, 0, 0), (k, 1, k, 0), (k, 1, k, k * k if tau else 0)]


def test_gradient_regime_needs_room_and_the_proxies_gradient(monkeypatch):
    """What is kept must fit in a chunk's rows of the gradient (N (k + 2) <= K d for the softmax),
    and there must be a gradient of the proxies to keep it in; else a buffer of its own."""
    n, c, k, _ = SHAPES["odd"]  # 13 * 5 > 3 * 16
    chosen = _set_row_regime(monkeypatch, "gradient", c * (k + 2) * 8)
    x, y, w = _inputs(n, c, k, "random", torch.float64)
    want = _value_and_grads(MF.mpa_dw_loss, x, y, w, "reference", proxies_per_class=k)
    _assert_matches(_value_and_grads(MF.mpa_dw_loss, x, y, w, "torch", proxies_per_class=k),
                    want, 1e-10)
    (gx,) = torch.autograd.grad(MF.mpa_dw_loss(x, y, w.detach(), proxies_per_class=k,
                                               backend="torch"), [x])
    _assert_matches([gx], want[1:2], 1e-10)
    assert [keep for _, keep in chosen] == ["buffer", "buffer"]
    x, y, w = _inputs(n, c, k, "random", torch.float64, d=22)  # 13 * 5 <= 3 * 22
    _value_and_grads(MF.mpa_dw_loss, x, y, w, "torch", proxies_per_class=k)
    MF.mpa_dw_loss(x, y, w.detach(), proxies_per_class=k, backend="torch").backward()
    assert [keep for _, keep in chosen[2:]] == ["gradient", "buffer"]


@pytest.mark.parametrize("regime", [None, *ROW_REGIMES])
def test_proxy_nca_regimes_match_reference(regime, monkeypatch):
    chosen = _set_row_regime(monkeypatch, regime, 7 * 8) if regime is not None else None
    x, y, w = _inputs(13, 7, 1, "random", torch.float64)
    got = _value_and_grads(MF.proxy_nca_loss, x, y, w, "torch")
    want = _value_and_grads(MF.proxy_nca_loss, x, y, w, "reference")
    _assert_matches(got, want, 1e-10)
    if regime is not None:
        _assert_regime(chosen, regime, 13)


@pytest.mark.parametrize("gamma", [1e-3, 1e-4, 1e-6])
@pytest.mark.parametrize("loss", list(MULTI_PROXY))
def test_fp32_at_small_gamma_matches_fp64(loss, gamma):
    """At small gamma, dS/ds_k = p_k (1 + (s_k - S) / gamma) holds two terms of size 1/gamma that
    cancel; formed apart in fp32 they lose the gradient (1e-1 relative error at gamma = 1e-6)."""
    x, y, w = _inputs(13, 7, 3, "random", torch.float64)
    kwargs = dict(proxies_per_class=3, gamma=gamma)
    want = _value_and_grads(MULTI_PROXY[loss], x, y, w, "torch", **kwargs)
    x32, w32 = (t.detach().float().requires_grad_() for t in (x, w))
    got = _value_and_grads(MULTI_PROXY[loss], x32, y, w32, "torch", **kwargs)
    for g, r in zip(got, want):
        assert float((g.double() - r).abs().max()) <= 1e-5 * float(r.abs().max())


@pytest.mark.parametrize("loss", ["mpa", "mpa_dw"])
def test_double_backward_is_refused(loss):
    """The gradients are computed, not traced: a graph of them (create_graph=True) would be
    missing their own dependence on the inputs, so it is refused rather than silently wrong, by
    the backend itself and through the front end."""
    x, y, w = _inputs(9, 7, 3, "random", torch.float64)
    spec = LossSpec(loss, 7, 3, 32.0, 0.1)
    value = torch_chunked.proxy_loss(F.normalize(x, dim=1), w, y, spec, 0.2)
    with pytest.raises(RuntimeError, match="backend='torch'.*backend='reference'"):
        torch.autograd.grad(value, [x, w], create_graph=True)
    value = MULTI_PROXY[loss](x, y, w, proxies_per_class=3, backend="torch")
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(value, [x, w], create_graph=True)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("loss", [*MULTI_PROXY, *ONE_PROXY])
def test_proxies_of_any_layout(loss, layout, monkeypatch):
    """Proxies that are a transposed (d, C*K) tensor, as a Linear layer's weight is, or every
    other row of a larger one: the same value and gradients as contiguous ones."""
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 2 * 13 * 3)
    k = 1 if loss in ONE_PROXY else 3
    fn = ONE_PROXY.get(loss) or MULTI_PROXY[loss]
    kwargs = {} if loss in ONE_PROXY else dict(proxies_per_class=k)
    x, y, w = _inputs(13, 7, k, "random", torch.float64)
    base = w.detach().t().contiguous().t() if layout == "transposed" else (
        torch.stack([w.detach(), w.detach()], 1).flatten(0, 1)[::2])
    odd = torch.nn.Parameter(base)
    assert not odd.is_contiguous()
    got = _value_and_grads(fn, x, y, odd, "torch", **kwargs)
    want = _value_and_grads(fn, x, y, w, "reference", **kwargs)
    _assert_matches(got, want, 1e-10)



# --- the unreduced terms: similarity_terms, proxy_terms ----------------------------------------

# The odd shapes, and labels outside [0, C) (a class-parallel shard's rows whose class another
# shard holds).
TERMS_SHAPES = {**SHAPES, "outside": (12, 6, 3, "outside")}
TERMS_CASES = [(loss, sim) for loss in MULTI_PROXY for sim in ("softmax", "max", "mean")] + [
    (loss, "softmax") for loss in ONE_PROXY]
HYPER = {"soft_triple": (20.0, 0.01), "proxy_nca": (MF.nca_alpha(9.0), 0.0)}


def _spec(loss, c, k, similarity):
    alpha, delta = HYPER.get(loss, (32.0, 0.1))
    return LossSpec(loss, c, k, alpha, delta, 0.1, similarity)


def _masked_lse(z, members):
    """log sum_{members} e^z along rows; -inf, with a zero gradient, for a row without members."""
    some = members.any(1)
    safe = torch.where(members, z, torch.where(some, float("-inf"), 0.0).unsqueeze(1))
    return torch.where(some, torch.logsumexp(safe, 1), float("-inf"))


def _plain_terms(x_hat, w_hat, labels, spec):
    """The terms of the backend contract, written out over the reference's class similarities."""
    S = reference.class_similarity(x_hat, w_hat, spec.proxies_per_class, spec.similarity,
                                   spec.gamma, normalise=False)
    c, a, d = spec.num_classes, spec.alpha, spec.delta
    pos = F.one_hot(labels.clamp(0, c - 1), c).bool() & ((labels >= 0) & (labels < c))[:, None]
    if spec.column_wise:
        return torch.stack([reference.log1p_sum_exp(-a * (S - d), pos, dim=0),
                            reference.log1p_sum_exp(a * (S + d), ~pos, dim=0)])
    everyone = torch.ones_like(pos)
    if spec.loss == "mpa_dw":
        lse = _masked_lse(a * (S + d), ~pos)
        extra = torch.where(pos, F.softplus(-a * (S - d)), 0.0).sum(1)
    elif spec.loss == "mpa_ap":
        lse = _masked_lse(a * torch.where(pos, d - S, S + d), everyone)
        extra = torch.zeros_like(lse)
    else:
        z = a * (S - d * pos.to(S.dtype))  # a bool tensor times a float is float32
        lse, extra = _masked_lse(z, everyone), -torch.where(pos, z, 0.0).sum(1)
    return torch.stack([lse, extra])


def _close(got, want, tol):
    """got (any float dtype) against the fp64 want, relative to want's largest finite entry."""
    scale = want[torch.isfinite(want)].abs().max() if torch.isfinite(want).any() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(scale))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", list(TERMS_SHAPES))
@pytest.mark.parametrize("loss, similarity", TERMS_CASES)
def test_terms_match_plain(loss, similarity, shape, dtype):
    """Both entry points, the class sweep in chunks of one class, two and all: the terms, the
    regulariser and the gradients of x and the raw proxies under random upstream gradients of
    both against the plain computation in fp64."""
    n, c, k, kind = TERMS_SHAPES[shape]
    k = 1 if loss in ONE_PROXY else k
    spec = _spec(loss, c, k, similarity)
    x64, y, w64 = _inputs(n, c, k, kind, torch.float64)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(2, c if spec.column_wise else n, generator=gen, dtype=torch.float64)
    g_reg = float(torch.randn((), generator=gen, dtype=torch.float64))
    want = _plain_terms(F.normalize(x64, dim=1), F.normalize(w64, dim=1), y, spec)
    want_reg = reference.proxy_regularizer(w64, k)
    want_grads = {
        "similarity_terms": torch.autograd.grad((g * want).sum(), [x64, w64], retain_graph=True),
        "proxy_terms": torch.autograd.grad((g * want).sum() + g_reg * want_reg, [x64, w64]),
    }
    x, w = (t.detach().to(dtype).requires_grad_() for t in (x64, w64))
    g_got = g.to(dtype)
    k_gemm = 1 if similarity == "mean" else k
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    for classes in (1, 2, c):
        budget = classes * n * k_gemm
        terms, reg = torch_chunked.proxy_terms(F.normalize(x, dim=1), w, y, spec,
                                               chunk_elements=budget)
        assert terms.dtype == dtype and reg.dtype == dtype and reg.dim() == 0
        _close(terms.detach(), want.detach(), tol)
        _close(reg.detach(), want_reg.detach(), tol)
        grads = torch.autograd.grad((g_got * terms).sum() + g_reg * reg, [x, w])
        for got_grad, want_grad in zip(grads, want_grads["proxy_terms"]):
            _close(got_grad, want_grad, tol)
        terms = torch_chunked.similarity_terms(F.normalize(x, dim=1), F.normalize(w, dim=1), y,
                                               spec, chunk_elements=budget)
        _close(terms.detach(), want.detach(), tol)
        grads = torch.autograd.grad((g_got * terms).sum(), [x, w])
        for got_grad, want_grad in zip(grads, want_grads["similarity_terms"]):
            _close(got_grad, want_grad, tol)


@pytest.mark.parametrize("shape", ["odd", "k10_absent", "single_class"])
@pytest.mark.parametrize("loss", list(LOSS_CLASSES))
def test_reductions_through_the_front_end(loss, shape, monkeypatch):
    """The loss modules with backend="torch" and reduction="none" (and "sum" for the row-wise
    losses) equal the reference backend's, in value and in the gradients of the embeddings and
    the proxies under random weights of the terms."""
    n, c, k, kind = SHAPES[shape]
    _chunk_classes(monkeypatch, 2, n, k)
    x, y, _ = _inputs(n, c, k, kind, torch.float64)
    kwargs = {} if loss in ONE_PROXY else dict(proxies_per_class=k)
    weights = torch.randn(c if loss in ("mpa", "proxy_anchor") else n, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(2))
    for reduction in ("none",) if loss in ("mpa", "proxy_anchor") else ("none", "sum"):
        results = []
        for backend in ("torch", "reference"):
            torch.manual_seed(0)
            module = LOSS_CLASSES[loss](c, D, backend=backend, reduction=reduction,
                                        dtype=torch.float64, **kwargs)
            value = module(x, y)
            objective = (weights * value).sum() if reduction == "none" else value
            results.append((value.detach(), *torch.autograd.grad(objective,
                                                                 [x, module.proxies])))
        _assert_matches(results[0], results[1], 1e-12)


def test_terms_double_backward_is_refused():
    x, y, w = _inputs(9, 7, 3, "random", torch.float64)
    terms, reg = torch_chunked.proxy_terms(F.normalize(x, dim=1), w, y,
                                           LossSpec("mpa_dw", 7, 3, 32.0, 0.1))
    with pytest.raises(RuntimeError, match="backend='torch'.*backend='reference'"):
        torch.autograd.grad(terms.sum() + reg, [x, w], create_graph=True)
