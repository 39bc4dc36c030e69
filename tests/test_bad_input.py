"""Bad input gets a ValueError or TypeError that names the problem, never a wrong number."""

import pytest
import torch

import mpa_kernels
from mpa_kernels import functional as MF


def _ok(n=6, c=4, k=2, d=8):
    return torch.randn(n, d), torch.randint(0, c, (n,)), torch.randn(c * k, d)


def _call(x, labels, w, k=2, **kw):
    kw.setdefault("backend", "reference")
    return MF.mpa_ap_loss(x, labels, w, proxies_per_class=k, **kw)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda x, y, w: (x, torch.tensor([0, 1, 2, 3, 4, 1]), w), ValueError, r"labels must lie in \[0, 4\)"),
        (lambda x, y, w: (x, torch.tensor([0, -1, 2, 3, 0, 1]), w), ValueError, r"labels must lie in"),
        (lambda x, y, w: (x, y.float(), w), TypeError, "labels must be an integer tensor"),
        (lambda x, y, w: (x, y.bool(), w), TypeError, "labels must be an integer tensor"),
        (lambda x, y, w: (x, y.tolist(), w), TypeError, "labels must be a torch.Tensor"),
        (lambda x, y, w: (x[None], y, w), ValueError, r"embeddings must have shape \(N, d\)"),
        (lambda x, y, w: (x, y[:, None], w), ValueError, r"labels must have shape \(N,\)"),
        (lambda x, y, w: (x, y, w[None]), ValueError, r"proxies must have shape"),
        (lambda x, y, w: (x, y[:5], w), ValueError, "embeddings has 6 rows but labels has 5"),
        (lambda x, y, w: (x[:, :7], y, w), ValueError, "embedding size 7 differs from the proxies' 8"),
        (lambda x, y, w: (x[:0], y[:0], w), ValueError, "empty batch"),
        (lambda x, y, w: (x.index_fill(0, torch.tensor([2]), float("nan")), y, w), ValueError, "NaN or infinite"),
        (lambda x, y, w: (x.index_fill(0, torch.tensor([2]), float("inf")), y, w), ValueError, "NaN or infinite"),
        (lambda x, y, w: (x, y, w.index_fill(0, torch.tensor([1]), float("nan"))), ValueError, "proxies contain NaN"),
        (lambda x, y, w: (x.long(), y, w), TypeError, "embeddings must be a floating-point"),
        (lambda x, y, w: (x, y, w[:7]), ValueError, "not a multiple of proxies_per_class"),
        (lambda x, y, w: (x, y.clamp(max=0), w[:2]), ValueError, "need at least 2 classes"),
    ],
)
def test_bad_tensors(mutate, exc, match):
    x, labels, w = mutate(*_ok())
    with pytest.raises(exc, match=match):
        _call(x, labels, w)


def test_mixed_devices():
    x, labels, w = _ok()
    w_meta = w.to("meta")
    with pytest.raises(ValueError, match="one device"):
        _call(x, labels, w_meta)


def test_validate_false_skips_value_checks_only():
    x, labels, w = _ok()
    x[0, 0] = float("nan")
    value = _call(x, labels, w, validate=False)  # the caller took responsibility
    assert torch.isnan(value)
    with pytest.raises(ValueError, match=r"embeddings must have shape"):
        _call(x[None], labels, w, validate=False)  # structure is always checked


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"proxies_per_class": 0}, ValueError, "proxies_per_class must be at least 1"),
        ({"proxies_per_class": 2.0}, TypeError, "proxies_per_class must be an int"),
        ({"num_classes": 1}, ValueError, "num_classes must be at least 2"),
        ({"similarity": "median"}, ValueError, "unknown similarity 'median'"),
        ({"backend": "cuda"}, ValueError, "unknown backend 'cuda'"),
        ({"alpha": 0.0}, ValueError, "alpha must be > 0"),
        ({"gamma": -1.0}, ValueError, "gamma must be > 0"),
        ({"tau": -0.1}, ValueError, "tau must be >= 0"),
        ({"delta": float("nan")}, ValueError, "delta must be finite"),
        ({"alpha": "32"}, TypeError, "alpha must be a real number"),
        ({"embedding_size": 0}, ValueError, "embedding_size must be at least 1"),
    ],
)
def test_bad_module_arguments(kwargs, exc, match):
    args = {"num_classes": 4, "embedding_size": 8, "proxies_per_class": 2}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        mpa_kernels.MPAAPLoss(**args)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"proxies_per_class": 0}, ValueError, "proxies_per_class must be at least 1"),
        ({"similarity": "median"}, ValueError, "unknown similarity"),
        ({"alpha": -1.0}, ValueError, "alpha must be > 0"),
        ({"backend": "gpu"}, ValueError, "unknown backend 'gpu'"),
    ],
)
def test_bad_functional_arguments(kwargs, exc, match):
    x, labels, w = _ok()
    args = {"proxies_per_class": 2}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MF.mpa_ap_loss(x, labels, w, **args)


def test_bad_scale():
    with pytest.raises(ValueError, match="scale must be > 0"):
        MF.proxy_nca_loss(*_ok(k=1), scale=0.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        mpa_kernels.ProxyNCALoss(4, 8, scale=-1.0)
    with pytest.raises(TypeError, match="scale must be a real number"):
        mpa_kernels.ProxyNCALoss(4, 8, scale="9")


@pytest.mark.parametrize("cls", [mpa_kernels.ProxyAnchorLoss, mpa_kernels.ProxyNCALoss,
                                 mpa_kernels.MPALoss, mpa_kernels.SoftTripleLoss])
def test_module_checks_its_inputs(cls):
    loss_fn = cls(4, 8)
    with pytest.raises(ValueError, match="differs from the proxies'"):
        loss_fn(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss_fn(torch.randn(3, 8), torch.tensor([0, 1, 4]))
