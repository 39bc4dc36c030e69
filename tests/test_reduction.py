"""The terms contract of the backends (row-wise ``(lse, extra)``, column-wise ``(P, N)``) and
``reduction=``: per-sample terms for the row-wise losses, per-class terms for the column-wise ones,
their mean/sum, and the refusal of a backend that computes only the mean."""

import pytest
import torch
import torch.nn.functional as F

import mpa_kernels
from mpa_kernels import functional as MF
from mpa_kernels.backends import BackendUnavailableError

F64 = torch.float64
ROW_WISE = {
    "mpa_dw": (MF.mpa_dw_loss, {"proxies_per_class": 3}),
    "mpa_ap": (MF.mpa_ap_loss, {"proxies_per_class": 3}),
    "soft_triple": (MF.soft_triple_loss, {"proxies_per_class": 3}),
    "proxy_nca": (MF.proxy_nca_loss, {}),
}


def _batch(k):
    x = torch.randn(9, 5, dtype=F64)
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 1, 0, 4])  # class 2 absent
    w = torch.randn(5 * k, 5, dtype=F64)
    return x, labels, w


@pytest.mark.parametrize("loss", sorted(ROW_WISE))
def test_row_wise_none_is_each_samples_own_loss(loss):
    fn, kw = ROW_WISE[loss]
    x, labels, w = _batch(kw.get("proxies_per_class", 1))
    terms = fn(x, labels, w, reduction="none", backend="reference", **kw)
    assert terms.shape == (9,)
    # A row-wise term depends on its sample alone (and carries the whole regulariser): it is the
    # loss of a batch of that one sample.
    alone = torch.stack([fn(x[i:i + 1], labels[i:i + 1], w, backend="reference", **kw)
                         for i in range(9)])
    torch.testing.assert_close(terms, alone, rtol=1e-13, atol=0)
    mean = fn(x, labels, w, backend="reference", **kw)
    total = fn(x, labels, w, reduction="sum", backend="reference", **kw)
    assert terms.mean().item() == pytest.approx(mean.item(), rel=1e-14)
    assert terms.sum().item() == pytest.approx(total.item(), rel=1e-14)


def test_row_wise_none_weights_samples_with_the_right_gradient():
    x, labels, w = _batch(3)
    weights = torch.rand(9, dtype=F64)
    xa = x.clone().requires_grad_(True)
    terms = MF.mpa_ap_loss(xa, labels, w, proxies_per_class=3, reduction="none",
                           backend="reference")
    (weights * terms).sum().backward()
    xb = x.clone().requires_grad_(True)
    sum(weights[i] * MF.mpa_ap_loss(xb[i:i + 1], labels[i:i + 1], w, proxies_per_class=3,
                                    backend="reference") for i in range(9)).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [1, 3])
def test_column_wise_none_is_each_classes_share(k):
    x, labels, w = _batch(k)
    alpha, delta, tau = 32.0, 0.1, 0.2
    fn = MF.proxy_anchor_loss if k == 1 else MF.mpa_loss
    kw = {} if k == 1 else {"proxies_per_class": k, "tau": tau}
    terms = fn(x, labels, w, reduction="none", backend="reference", **kw)
    assert terms.shape == (5,)
    mean = fn(x, labels, w, backend="reference", **kw)
    assert terms.sum().item() == pytest.approx(mean.item(), rel=1e-13)
    # Written out on its own: P_c / |C+| + N_c / C (+ tau R / C), P_c = 0 for the absent class.
    S = mpa_kernels.reference.class_similarity(x, w, k)
    present = {int(c) for c in labels}
    reg = mpa_kernels.reference.proxy_regularizer(w, k) if k > 1 else 0.0
    for c in range(5):
        pos = labels == c
        p = torch.log1p(torch.exp(-alpha * (S[pos, c] - delta)).sum())
        n = torch.log1p(torch.exp(alpha * (S[~pos, c] + delta)).sum())
        expected = p / len(present) + n / 5 + (tau * reg / 5 if k > 1 else 0.0)
        assert terms[c].item() == pytest.approx(float(expected), rel=1e-12), c
    assert 2 not in present


def test_sum_is_refused_for_the_column_wise_losses_and_unknown_reductions():
    x, labels, w = _batch(2)
    with pytest.raises(ValueError, match="already a sum over classes"):
        MF.mpa_loss(x, labels, w, proxies_per_class=2, reduction="sum")
    with pytest.raises(ValueError, match="already a sum over classes"):
        mpa_kernels.ProxyAnchorLoss(5, 5, reduction="sum")
    with pytest.raises(ValueError, match="unknown reduction 'batchmean'"):
        MF.mpa_ap_loss(x, labels, w, proxies_per_class=2, reduction="batchmean")


def test_modules_take_the_reduction():
    x, labels, _ = _batch(1)
    loss_fn = mpa_kernels.SoftTripleLoss(5, 5, 2, reduction="none", backend="reference",
                                         dtype=F64)
    assert loss_fn(x, labels).shape == (9,)
    loss_fn.reduction = "mean"
    assert loss_fn(x, labels).dim() == 0
    assert mpa_kernels.MPALoss(5, 5, 2, reduction="none", dtype=F64)(x, labels).shape == (5,)


def test_a_mean_only_backend_refuses_other_reductions_and_auto_skips_it(monkeypatch):
    import types

    from mpa_kernels import backends

    x, labels, w = _batch(2)
    reference = backends._load("reference")
    mean_only = types.SimpleNamespace(
        __name__="mean_only", LOW_PRECISION=False, unavailable_reason=lambda device: None,
        similarity_loss=lambda x_hat, w_hat, y, spec: MF.row_losses(reference.similarity_terms(
            x_hat, w_hat, y, spec), spec).mean())
    monkeypatch.setitem(backends.sys.modules, backends._MODULES["torch"], mean_only)
    mean = MF.mpa_dw_loss(x, labels, w, proxies_per_class=2, backend="torch")
    expected = MF.mpa_dw_loss(x, labels, w, proxies_per_class=2, backend="reference")
    assert mean.item() == pytest.approx(expected.item(), rel=1e-14)
    with pytest.raises(BackendUnavailableError, match="backend 'torch'.*only reduction='mean'"):
        MF.mpa_dw_loss(x, labels, w, proxies_per_class=2, backend="torch", reduction="none")
    assert backends.auto_backend(torch.device("cpu"), reduction="none") == "reference"
    terms = MF.mpa_dw_loss(x, labels, w, proxies_per_class=2, reduction="none")
    torch.testing.assert_close(terms.mean(), expected, rtol=1e-14, atol=0)


def test_reference_oracle_terms_reduce_to_its_losses():
    S = torch.randn(7, 4, dtype=F64).tanh()
    labels = torch.tensor([0, 1, 1, 3, 0, 0, 3])
    ref = mpa_kernels.reference
    P, N = ref.mpa_similarity_terms(S, labels)
    assert P[2] == 0
    assert ref.mpa_similarity_loss(S, labels) == P.sum() / 3 + N.sum() / 4
    logits = 20.0 * (S - 0.01 * F.one_hot(labels, 4))
    torch.testing.assert_close(ref.soft_triple_similarity_terms(S, labels),
                               F.cross_entropy(logits, labels, reduction="none"))


def test_mean_prefers_a_backends_scalar_entry_point_and_other_reductions_its_terms(monkeypatch):
    import types

    from mpa_kernels import backends

    reference = backends._load("reference")
    used = []

    def similarity_loss(*args):
        used.append("similarity_loss")
        return MF.row_losses(reference.similarity_terms(*args), args[3]).mean()

    def similarity_terms(*args):
        used.append("similarity_terms")
        return reference.similarity_terms(*args)

    both = types.SimpleNamespace(__name__="both", LOW_PRECISION=False,
                                 unavailable_reason=lambda device: None,
                                 similarity_loss=similarity_loss, similarity_terms=similarity_terms)
    monkeypatch.setitem(backends.sys.modules, backends._MODULES["torch"], both)
    x, labels, w = _batch(2)
    for reduction in ("mean", "none", "sum"):
        MF.soft_triple_loss(x, labels, w, proxies_per_class=2, backend="torch",
                            reduction=reduction)
    assert used == ["similarity_loss", "similarity_terms", "similarity_terms"]


SPECS = {
    "mpa": MF.LossSpec("mpa", 5, 3, alpha=32.0, delta=0.1),
    "proxy_anchor": MF.LossSpec("proxy_anchor", 5, 1, alpha=32.0, delta=0.1),
    "mpa_dw": MF.LossSpec("mpa_dw", 5, 3, alpha=32.0, delta=0.1, similarity="max"),
    "mpa_ap": MF.LossSpec("mpa_ap", 5, 3, alpha=32.0, delta=0.1, similarity="mean"),
    "soft_triple": MF.LossSpec("soft_triple", 5, 3, alpha=20.0, delta=0.01),
    "proxy_nca": MF.LossSpec("proxy_nca", 5, 1, alpha=18.0, delta=0.0),
}
_ORACLE = {"mpa": "mpa", "proxy_anchor": "mpa", "mpa_dw": "mpa_dw", "mpa_ap": "mpa_ap",
           "soft_triple": "soft_triple", "proxy_nca": "soft_triple"}


def _reference_terms(x, labels, w, spec):
    from mpa_kernels.backends import reference as backend

    return backend.similarity_terms(F.normalize(x, dim=1), F.normalize(w, dim=1), labels, spec)


@pytest.mark.parametrize("loss", sorted(SPECS))
def test_reference_backend_terms_decompose_the_oracles_terms(loss):
    """The backend's (lse, extra) or (P, N), reduced by the front end, are the oracle's
    one-function-per-equation terms."""
    spec = SPECS[loss]
    x, labels, w = _batch(spec.proxies_per_class)
    terms = _reference_terms(x, labels, w, spec)
    S = mpa_kernels.reference.class_similarity(x, w, spec.proxies_per_class, spec.similarity,
                                               spec.gamma)
    oracle = getattr(mpa_kernels.reference, f"{_ORACLE[loss]}_similarity_terms")(
        S, labels, spec.alpha, spec.delta)
    if spec.column_wise:
        assert terms.shape == (2, 5)
        torch.testing.assert_close(terms, torch.stack(oracle), rtol=1e-12, atol=1e-12)
        assert terms[0, 2] == 0  # class 2 is absent
    else:
        assert terms.shape == (2, 9)
        torch.testing.assert_close(MF.row_losses(terms, spec), oracle, rtol=1e-12, atol=1e-12)
        if loss == "mpa_ap":
            assert (terms[1] == 0).all()


def _plain_terms(S, labels, spec):
    """The contract's terms written out element by element, for any labels."""
    n, c = S.shape
    a, d = spec.alpha, spec.delta
    out = torch.zeros(2, c if spec.column_wise else n, dtype=S.dtype)
    if spec.column_wise:
        for j in range(c):
            out[0, j] = torch.log1p(sum((torch.exp(-a * (S[i, j] - d)) for i in range(n)
                                         if labels[i] == j), torch.tensor(0.0, dtype=S.dtype)))
            out[1, j] = torch.log1p(sum((torch.exp(a * (S[i, j] + d)) for i in range(n)
                                         if labels[i] != j), torch.tensor(0.0, dtype=S.dtype)))
        return out
    for i in range(n):
        y = int(labels[i])
        if spec.loss == "mpa_dw":
            z = [a * (S[i, j] + d) for j in range(c) if j != y]
            extra = F.softplus(-a * (S[i, y] - d)) if 0 <= y < c else 0.0
        elif spec.loss == "mpa_ap":
            z = [a * ((d - S[i, j]) if j == y else (S[i, j] + d)) for j in range(c)]
            extra = 0.0
        else:
            z = [a * (S[i, j] - (d if j == y else 0.0)) for j in range(c)]
            extra = -a * (S[i, y] - d) if 0 <= y < c else 0.0
        out[0, i] = torch.logsumexp(torch.stack(z), 0) if z else float("-inf")
        out[1, i] = extra
    return out


@pytest.mark.parametrize("loss", sorted(SPECS))
def test_reference_backend_terms_take_labels_outside_the_classes(loss):
    """Labels outside [0, C) (a shard of the classes that does not hold the positive): no class
    is positive for that row, every one a negative."""
    spec = SPECS[loss]
    x, _, w = _batch(spec.proxies_per_class)
    labels = torch.tensor([0, -1, 5, 3, 7, 3, 1, 0, 4])
    terms = _reference_terms(x, labels, w, spec)
    S = mpa_kernels.reference.class_similarity(x, w, spec.proxies_per_class, spec.similarity,
                                               spec.gamma)
    torch.testing.assert_close(terms, _plain_terms(S, labels, spec), rtol=1e-12, atol=1e-12)
    if not spec.column_wise:
        assert (terms[1, [1, 2, 4]] == 0).all()

