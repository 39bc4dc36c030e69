"""Ladder step 1: the reference is right.

float64 gradcheck of every reference loss, and cross-checks against independent implementations:
pytorch-metric-learning's ProxyAnchorLoss (MPA with K = 1 and tau = 0), SoftTripleLoss with
SparseCentersRegularizer, and ProxyNCALoss.
"""

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import regularizers as pml_regularizers

import reference

F64 = torch.float64


def _inputs(n=7, c=5, k=3, d=6, absent=(3,)):
    x = torch.randn(n, d, dtype=F64, requires_grad=True)
    present = [i for i in range(c) if i not in absent]
    labels = torch.tensor([present[i % len(present)] for i in range(n)])
    w = torch.randn(c * k, d, dtype=F64, requires_grad=True)
    return x, labels, w


MULTI_PROXY = {
    "mpa": reference.mpa_loss,
    "mpa_dw": reference.mpa_dw_loss,
    "mpa_ap": reference.mpa_ap_loss,
    "soft_triple": reference.soft_triple_loss,
}


@pytest.mark.parametrize("similarity", ["softmax", "max", "mean"])
@pytest.mark.parametrize("name", sorted(MULTI_PROXY))
def test_gradcheck_multi_proxy(name, similarity):
    x, labels, w = _inputs()
    fn = MULTI_PROXY[name]
    assert torch.autograd.gradcheck(
        lambda x, w: fn(x, labels, w, 3, similarity=similarity), (x, w)
    )


@pytest.mark.parametrize("fn", [reference.proxy_anchor_loss, reference.proxy_nca_loss])
def test_gradcheck_single_proxy(fn):
    x, labels, w = _inputs(k=1)
    assert torch.autograd.gradcheck(lambda x, w: fn(x, labels, w), (x, w))


def test_gradcheck_regularizer():
    _, _, w = _inputs(k=4)
    assert torch.autograd.gradcheck(lambda w: reference.proxy_regularizer(w, 4), (w,))


def test_log1p_sum_exp_is_stable_and_exact():
    z = torch.tensor([[1000.0, -1000.0], [-5.0, 2.0]], dtype=F64)
    out = reference.log1p_sum_exp(z)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(1000.0)
    assert out[1].item() == pytest.approx(torch.log1p(torch.exp(z[1]).sum()).item(), rel=1e-15)
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert torch.equal(reference.log1p_sum_exp(z, empty), torch.zeros(2, dtype=F64))


def test_class_similarity_modes():
    x, _, w = _inputs(k=3)
    s = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T)
    s = s.view(len(x), -1, 3)
    S_max = reference.class_similarity(x, w, 3, "max")
    S_mean = reference.class_similarity(x, w, 3, "mean")
    S_soft = reference.class_similarity(x, w, 3, "softmax", gamma=1e-4)
    torch.testing.assert_close(S_max, s.max(2).values)
    torch.testing.assert_close(S_mean, s.mean(2))
    torch.testing.assert_close(S_soft, S_max)  # gamma -> 0 makes the softmax a max
    x1, _, w1 = _inputs(k=1)
    S1 = [reference.class_similarity(x1, w1, 1, m) for m in ("softmax", "max", "mean")]
    torch.testing.assert_close(S1[0], S1[1])
    torch.testing.assert_close(S1[0], S1[2])


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _assert_matches_pml(ours, x, w, labels, pml_loss, pml_weight, as_rows, rtol):
    """Value and both gradients of our loss against a pytorch-metric-learning loss that was handed
    the same proxies (``as_rows`` maps pml's weight layout to ours)."""
    gx, gw = torch.autograd.grad(ours, (x, w))
    with torch.no_grad():
        pml_weight.copy_(as_rows(w))
    x2 = x.detach().clone().requires_grad_(True)
    theirs = pml_loss(x2, labels)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= rtol * abs(theirs.item())
    assert _max_rel(gx, x2.grad) < 100 * rtol
    assert _max_rel(gw, as_rows(pml_weight.grad)) < 100 * rtol
    return theirs


def test_mpa_k1_equals_pml_proxy_anchor_value_and_gradients():
    torch.manual_seed(1)
    x, labels, w = _inputs(n=9, c=6, k=1, d=8, absent=(2, 5))
    ours = reference.mpa_loss(x, labels, w, 1, alpha=32.0, delta=0.1, tau=0.0)
    pml = pml_losses.ProxyAnchorLoss(num_classes=6, embedding_size=8, margin=0.1, alpha=32).double()
    theirs = _assert_matches_pml(ours, x, w, labels, pml, pml.proxies, lambda p: p, 1e-12)
    # The standalone ProxyAnchor reference agrees too (an independent expression of eq. 6).
    pa = reference.proxy_anchor_loss(x, labels, w)
    assert abs(pa.item() - theirs.item()) <= 1e-12 * abs(theirs.item())


def test_soft_triple_equals_pml_with_sparse_centers_regularizer():
    torch.manual_seed(2)
    n, c, k, d = 11, 5, 4, 8
    x, labels, w = _inputs(n=n, c=c, k=k, d=d, absent=(1,))
    ours = reference.soft_triple_loss(x, labels, w, k, la=20.0, delta=0.01, gamma=0.1, tau=0.2)
    reg = pml_regularizers.SparseCentersRegularizer(num_classes=c, centers_per_class=k)
    pml = pml_losses.SoftTripleLoss(
        num_classes=c, embedding_size=d, centers_per_class=k, la=20, gamma=0.1, margin=0.01,
        weight_regularizer=reg, weight_reg_weight=0.2,
    ).double()
    # pml stores the centres as columns, class-major like ours
    _assert_matches_pml(ours, x, w, labels, pml, pml.fc, lambda p: p.T, 1e-10)


def test_proxy_nca_equals_pml():
    x, labels, w = _inputs(n=10, c=7, k=1, d=5)
    ours = reference.proxy_nca_loss(x, labels, w, scale=9.0)
    pml = pml_losses.ProxyNCALoss(num_classes=7, embedding_size=5, softmax_scale=9.0).double()
    _assert_matches_pml(ours, x, w, labels, pml, pml.proxies, lambda p: p, 1e-10)


def test_mpa_ap_hand_computed():
    # Two classes, one proxy each, one sample of class 0: S = [s0, s1] and
    # L = log(1 + exp(a (d - s0)) + exp(a (s1 + d))).
    x = torch.tensor([[1.0, 0.0]], dtype=F64)
    w = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=F64)
    a, dl = 4.0, 0.1
    expected = math.log(1 + math.exp(a * (dl - 0.6)) + math.exp(a * dl))
    got = reference.mpa_ap_loss(x, torch.tensor([0]), w, 1, alpha=a, delta=dl, tau=0.0)
    assert got.item() == pytest.approx(expected, rel=1e-14)
    dw = reference.mpa_dw_loss(x, torch.tensor([0]), w, 1, alpha=a, delta=dl, tau=0.0)
    expected_dw = math.log1p(math.exp(-a * (0.6 - dl))) + math.log1p(math.exp(a * dl))
    assert dw.item() == pytest.approx(expected_dw, rel=1e-14)


def test_regularizer_value():
    # One class, K = 2, orthogonal proxies: sqrt(2 - 0) / (1 * 2 * 1).
    w = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64)
    assert reference.proxy_regularizer(w, 2).item() == pytest.approx(2**0.5 / 2, rel=1e-12)
    assert reference.proxy_regularizer(w, 1).item() == 0.0


def _layouts(rows, cols):
    """The same (rows, cols) values as a contiguous tensor, a transposed Parameter, and strided
    views of larger tensors."""
    base = torch.randn(rows, cols, dtype=F64)
    wide = torch.zeros(rows, 2 * cols, dtype=F64)
    wide[:, ::2] = base
    tall = torch.zeros(2 * rows, cols, dtype=F64)
    tall[1::2] = base
    return base, {
        "transposed Parameter": torch.nn.Parameter(base.t().contiguous()).t(),
        "column step 2": wide[:, ::2],
        "row step 2": tall[1::2],
    }


@pytest.mark.parametrize("name", sorted(MULTI_PROXY) + ["proxy_regularizer"])
def test_every_proxy_layout_gives_the_same_loss_and_gradient(name):
    x, labels, _ = _inputs()
    base, layouts = _layouts(15, 6)
    if name == "proxy_regularizer":
        fn = lambda w: reference.proxy_regularizer(w, 3)  # noqa: E731
    else:
        fn = lambda w: MULTI_PROXY[name](x, labels, w, 3)  # noqa: E731
    w0 = base.clone().requires_grad_(True)
    expected = fn(w0)
    (g0,) = torch.autograd.grad(expected, w0)
    for layout, w in layouts.items():
        assert not w.is_contiguous(), layout
        leaf = w.detach().requires_grad_(True)
        value = fn(leaf)
        (g,) = torch.autograd.grad(value, leaf)
        assert value.item() == pytest.approx(expected.item(), rel=1e-13), layout
        torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-14)


def test_class_similarity_without_normalising():
    """The form the library's reference backend calls with rows it has already normalised."""
    x, _, w = _inputs()
    xn, wn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(w, dim=1)
    torch.testing.assert_close(reference.class_similarity(xn, wn, 3, normalise=False),
                               reference.class_similarity(x, w, 3), rtol=1e-14, atol=1e-15)
    # Not normalised: scaling a row scales its similarities.
    S = reference.class_similarity(2.0 * xn, wn, 3, "mean", normalise=False)
    torch.testing.assert_close(S, 2.0 * reference.class_similarity(x, w, 3, "mean"))
