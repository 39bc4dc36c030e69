"""The Triton loss kernels as ``torch.library`` custom operators: schema, fake (meta) kernels and
autograd registration pass ``torch.library.opcheck``, and ``torch.compile(fullgraph=True)`` records
the forward and backward operators as single nodes, with values and gradients equal to eager.

On CPU the kernels run in the Triton interpreter (conftest.py), the compile backend is
``aot_eager`` (it traces forward and backward graphs without generating code, which keeps it quick).
"""

import pytest
import torch
import torch.nn.functional as nnF
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import mpa_kernels.functional as F
from mpa_kernels.kernels.similarity import similarity_terms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = {"mpa": (32.0, 0.1), "mpa_dw": (32.0, 0.1), "mpa_ap": (32.0, 0.1),
         "soft_triple": (20.0, 0.01)}


@pytest.mark.parametrize("loss,similarity,k", [
    ("mpa", "softmax", 3), ("mpa_dw", "max", 2), ("mpa_ap", "mean", 3), ("soft_triple", "softmax", 1),
])
def test_opcheck(loss, similarity, k):
    n, c = 9, 4
    s = torch.randn(n, c * k, device=DEVICE).tanh().requires_grad_()
    labels = torch.randint(0, c, (n,), device=DEVICE)
    alpha, delta = HYPER[loss]
    args = (s, labels, loss, c, k, similarity, alpha, delta, 0.1)
    torch.library.opcheck(torch.ops.mpa_kernels.similarity_terms.default, args)
    terms = torch.ops.mpa_kernels.similarity_terms(*args).detach()
    grad = torch.rand_like(terms)
    torch.library.opcheck(torch.ops.mpa_kernels.similarity_terms_backward.default,
                          (grad, s.detach(), labels, terms) + args[2:])


def assert_compiles_to_single_ops(fn, x, w, labels, op):
    """torch.compile(fullgraph=True) of ``fn``: the forward graph holds ``mpa_kernels.<op>``, the
    backward ``mpa_kernels.<op>_backward``, each as one node, and values and gradients equal
    eager. The aot_eager-style backend traces both graphs without generating code (quick on CPU)."""
    eager = fn(x, w, labels)
    eager_grads = torch.autograd.grad(eager, (x, w))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm)

    compiled = torch.compile(fn, fullgraph=True,
                             backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    value = compiled(x, w, labels)
    grads = torch.autograd.grad(value, (x, w))
    forward_graph, backward_graph = graphs
    assert f"mpa_kernels.{op}.default" in forward_graph
    assert f"mpa_kernels.{op}_backward.default" in backward_graph
    torch.testing.assert_close(value, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def _loss_from_embeddings(x, w, labels):
    s = nnF.normalize(x, dim=1) @ nnF.normalize(w, dim=1).T
    return similarity_terms(s, labels, "mpa", 5, 2, "softmax", 32.0, 0.1, 0.1).sum()


def test_compile_fullgraph_records_the_operators():
    x = torch.randn(11, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 5, (11,), device=DEVICE)
    assert_compiles_to_single_ops(_loss_from_embeddings, x, w, labels, "similarity_terms")


def test_compile_fullgraph_through_the_public_api():
    proxies = torch.nn.Parameter(torch.randn(12, 8, device=DEVICE))
    x = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 4, (9,), device=DEVICE)

    def loss_fn(x, labels):
        return F.mpa_dw_loss(x, labels, proxies, proxies_per_class=3, backend="triton",
                             validate=False)

    eager = loss_fn(x, labels)
    value = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, labels)
    torch.testing.assert_close(value, eager)
