"""Second derivatives: Hessian-vector products (``create_graph=True``, then a second grad) are right
where a backend can give them, and refused with one clear error where it cannot."""

import pytest
import torch

from mpa_kernels import functional as MF

F64 = torch.float64

LOSSES = {
    "mpa": MF.mpa_loss,
    "mpa_dw": MF.mpa_dw_loss,
    "mpa_ap": MF.mpa_ap_loss,
    "soft_triple": MF.soft_triple_loss,
}


def _inputs(n=6, c=3, k=2, d=4):
    x = torch.randn(n, d, dtype=F64, requires_grad=True)
    labels = torch.arange(n) % c
    w = torch.randn(c * k, d, dtype=F64, requires_grad=True)
    return x, labels, w


def test_unit_rows_gradgradcheck():
    # Rows of very different lengths: 1 / ||v|| depends on v, which a second derivative must see.
    v = (torch.randn(5, 3, dtype=F64) * torch.tensor([[1e-3], [0.5], [1.0], [7.0], [300.0]],
                                                      dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradgradcheck(MF.unit_rows, (v,))


def test_regularizer_gradgradcheck():
    w = torch.randn(8, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda w: MF.proxy_regularizer(w, 4), (w,))


@pytest.mark.parametrize("similarity", ["softmax", "max", "mean"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reference_backend_gradgradcheck(name, similarity):
    x, labels, w = _inputs()
    fn = LOSSES[name]
    assert torch.autograd.gradgradcheck(
        lambda x, w: fn(x, labels, w, proxies_per_class=2, similarity=similarity,
                        backend="reference"),
        (x, w),
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hessian_vector_product_matches_finite_differences(name):
    """The way gradient-penalty and meta-learning code takes it: grad with create_graph=True, then
    the grad of <grad, v>; against central differences of the gradient in float64."""
    torch.manual_seed(3)
    x, labels, w = _inputs(n=9, c=4, k=3, d=5)
    fn = LOSSES[name]
    vx, vw = torch.randn_like(x), torch.randn_like(w)

    def grads(x, w, create_graph=False):
        value = fn(x, labels, w, proxies_per_class=3, backend="reference")
        return torch.autograd.grad(value, (x, w), create_graph=create_graph)

    gx, gw = grads(x, w, create_graph=True)
    hx, hw = torch.autograd.grad((gx * vx).sum() + (gw * vw).sum(), (x, w))
    eps = 1e-6

    def shifted(sign):
        return grads((x + sign * eps * vx).detach().requires_grad_(),
                     (w + sign * eps * vw).detach().requires_grad_())

    plus, minus = shifted(1.0), shifted(-1.0)
    for h, p, m in zip((hx, hw), plus, minus):
        fd = (p - m) / (2 * eps)
        assert ((h - fd).norm() / fd.norm()).item() < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-linear"])
def test_backends_without_second_derivatives_refuse_create_graph(backend):
    x, labels, w = _inputs()
    x32, w32 = (t.detach().float().requires_grad_() for t in (x, w))
    value = MF.mpa_loss(x32, labels, w32, proxies_per_class=2, backend=backend)
    with pytest.raises(RuntimeError, match=rf"backend '{backend}' gives first derivatives only.*"
                                           r"create_graph=True.*backend='reference'"):
        torch.autograd.grad(value, (x32, w32), create_graph=True)
    # Without a graph the same call is a plain first-order backward.
    value = MF.mpa_loss(x32, labels, w32, proxies_per_class=2, backend=backend)
    gx, gw = torch.autograd.grad(value, (x32, w32))
    ref = MF.mpa_loss(x, labels, w, proxies_per_class=2, backend="reference")
    rx, rw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)
