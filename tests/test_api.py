"""The public API: modules and functions agree with each other and with the reference, own their
proxies in the documented layout, keep dtypes, compute in fp32 under autocast, and dispatch backends
as documented."""

import pytest
import torch

import mpa_kernels
import reference
from mpa_kernels import functional as MF
from mpa_kernels.backends import BackendUnavailableError

F64 = torch.float64

MULTI = [
    (mpa_kernels.MPALoss, MF.mpa_loss, reference.mpa_loss, {}),
    (mpa_kernels.MPADWLoss, MF.mpa_dw_loss, reference.mpa_dw_loss, {}),
    (mpa_kernels.MPAAPLoss, MF.mpa_ap_loss, reference.mpa_ap_loss, {}),
    (mpa_kernels.SoftTripleLoss, MF.soft_triple_loss, reference.soft_triple_loss, {"la": 20.0}),
]


def _batch(n=12, c=6, d=8, dtype=F64):
    x = torch.randn(n, d, dtype=dtype)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 4, 4, 5, 0, 1, 1][:n])  # class 3 absent
    return x, labels


@pytest.mark.parametrize("similarity", ["softmax", "max", "mean"])
@pytest.mark.parametrize("module_cls,fn,ref,ref_kw", MULTI)
def test_module_functional_and_reference_agree(module_cls, fn, ref, ref_kw, similarity):
    x, labels = _batch()
    loss_fn = module_cls(6, 8, proxies_per_class=3, similarity=similarity, backend="reference",
                         dtype=F64)
    assert loss_fn.proxies.shape == (18, 8)
    xm = x.clone().requires_grad_(True)
    value = loss_fn(xm, labels)
    value.backward()

    xf = x.clone().requires_grad_(True)
    w = loss_fn.proxies.detach().clone().requires_grad_(True)
    value_f = fn(xf, labels, w, proxies_per_class=3, similarity=similarity, backend="reference")
    value_f.backward()
    assert value.item() == value_f.item()
    assert torch.equal(xm.grad, xf.grad)
    assert torch.equal(loss_fn.proxies.grad, w.grad)

    alpha = ref_kw.get("la", loss_fn.alpha)
    ref_kw = {k: v for k, v in ref_kw.items() if k != "la"}
    if module_cls is mpa_kernels.SoftTripleLoss:
        expected = ref(x, labels, w.detach(), 3, la=alpha, delta=loss_fn.delta, gamma=0.1,
                       tau=0.2, similarity=similarity)
    else:
        expected = ref(x, labels, w.detach(), 3, similarity=similarity)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)


def test_single_proxy_losses_match_their_references():
    x, labels = _batch()
    pa = mpa_kernels.ProxyAnchorLoss(6, 8, backend="reference", dtype=F64)
    assert pa.proxies.shape == (6, 8)
    expected = reference.proxy_anchor_loss(x, labels, pa.proxies.detach())
    assert pa(x, labels).item() == pytest.approx(expected.item(), rel=1e-12)
    mpa = MF.mpa_loss(x, labels, pa.proxies.detach(), proxies_per_class=1, tau=0.0)
    assert mpa.item() == pytest.approx(expected.item(), rel=1e-12)

    nca = mpa_kernels.ProxyNCALoss(6, 8, scale=3.0, backend="reference", dtype=F64)
    expected = reference.proxy_nca_loss(x, labels, nca.proxies.detach(), scale=3.0)
    assert nca(x, labels).item() == pytest.approx(expected.item(), rel=1e-12)


def test_proxy_layout_is_class_major():
    # Moving every proxy of class 2 onto the embedding of its only sample drives that sample's
    # class similarity to 1: row c*K + k is proxy k of class c.
    k, d = 3, 4
    w = torch.randn(5 * k, d, dtype=F64)
    x = torch.randn(1, d, dtype=F64)
    w[2 * k:3 * k] = x
    S = reference.class_similarity(x, w, k)
    assert S[0, 2].item() == pytest.approx(1.0, abs=1e-12)
    assert (S[0, [0, 1, 3, 4]] < 1 - 1e-6).all()


def test_proxies_keep_their_dtype_and_grads_come_back_in_input_dtype():
    loss_fn = mpa_kernels.MPAAPLoss(6, 8, proxies_per_class=2, backend="reference")
    assert loss_fn.proxies.dtype == torch.float32
    x, labels = _batch(dtype=torch.bfloat16)
    x.requires_grad_(True)
    value = loss_fn(x, labels)
    value.backward()
    assert value.dtype == torch.float32
    assert loss_fn.proxies.dtype == torch.float32
    assert loss_fn.proxies.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


def test_autocast_computes_in_fp32():
    loss_fn = mpa_kernels.MPALoss(6, 8, proxies_per_class=2, backend="reference")
    x, labels = _batch(dtype=torch.float32)
    plain = loss_fn(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss_fn(x, labels)
    assert auto.dtype == torch.float32
    assert auto.item() == plain.item()


def test_half_inputs_equal_fp32_on_rounded_values():
    x, labels = _batch(dtype=torch.float16)
    w = torch.randn(12, 8).half()
    got = MF.mpa_dw_loss(x, labels, w, proxies_per_class=2, backend="reference")
    expected = MF.mpa_dw_loss(x.float(), labels, w.float(), proxies_per_class=2,
                              backend="reference")
    assert got.dtype == torch.float32
    assert got.item() == expected.item()


def test_int32_labels_accepted():
    x, labels = _batch()
    w = torch.randn(12, 8, dtype=F64)
    a = MF.mpa_loss(x, labels, w, proxies_per_class=2, backend="reference")
    b = MF.mpa_loss(x, labels.int(), w, proxies_per_class=2, backend="reference")
    assert a.item() == b.item()


def test_auto_backend_on_cpu_is_not_the_interpreter():
    assert mpa_kernels.auto_backend(torch.device("cpu")) in ("torch", "reference")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        mpa_kernels.MPALoss(4, 8, backend="cuda")
    x, labels = _batch()
    with pytest.raises(ValueError, match="unknown backend"):
        MF.mpa_loss(x, labels, torch.randn(12, 8, dtype=F64), proxies_per_class=2,
                    backend="fast")


def test_missing_backend_module_is_a_clear_error(monkeypatch):
    from mpa_kernels import backends

    monkeypatch.setitem(backends._MODULES, "triton-linear", "mpa_kernels.backends._not_shipped")
    with pytest.raises(BackendUnavailableError, match="not implemented in this version"):
        mpa_kernels.MPALoss(4, 8, backend="triton-linear")
    x, labels = _batch()
    with pytest.raises(BackendUnavailableError, match="not implemented in this version"):
        MF.mpa_loss(x, labels, torch.randn(12, 8, dtype=F64), proxies_per_class=2,
                    backend="triton-linear")


def test_triton_backends_refuse_cpu_without_interpreter(monkeypatch):
    from mpa_kernels import backends

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("triton", "triton-linear"):
        module = backends._load(name)
        if module is None:
            continue  # not shipped in this version: covered by the test above
        assert module.unavailable_reason(torch.device("cpu")) is not None
        x, labels = _batch()
        with pytest.raises(BackendUnavailableError, match="cannot run on cpu"):
            MF.mpa_loss(x, labels, torch.randn(12, 8, dtype=F64), proxies_per_class=2,
                        backend=name)


def test_module_is_trainable():
    torch.manual_seed(0)
    loss_fn = mpa_kernels.MPAAPLoss(3, 4, proxies_per_class=2, backend="reference")
    x = torch.randn(12, 4)
    labels = torch.arange(12) % 3
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    first = loss_fn(x, labels).item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn(x, labels).backward()
        opt.step()
    assert loss_fn(x, labels).item() < first


def test_auto_skips_a_backend_that_cannot_compute_the_spec(monkeypatch):
    import types

    from mpa_kernels import backends
    from mpa_kernels._spec import LossSpec

    limited = types.SimpleNamespace(
        LOW_PRECISION=False,
        unavailable_reason=lambda device: None,
        unsupported_reason=lambda spec: "at most 4 proxies" if spec.proxies_per_class > 4 else None,
    )
    monkeypatch.setitem(backends.sys.modules, backends._MODULES["torch"], limited)
    small = LossSpec("mpa", 10, 4, 32.0, 0.1)
    large = LossSpec("mpa", 10, 40, 32.0, 0.1)
    cpu = torch.device("cpu")
    assert backends.auto_backend(cpu, small) == "torch"
    assert backends.auto_backend(cpu, large) == "reference"
    with pytest.raises(BackendUnavailableError, match="at most 4 proxies"):
        backends.resolve("torch", cpu, large)


def test_unit_rows_matches_f_normalize_and_its_gradient():
    v = torch.randn(7, 5, dtype=F64)
    v[3] = 0.0  # a clamped row: gradient is g / eps, as F.normalize's
    v[4] *= 1e-13
    g = torch.randn(7, 5, dtype=F64)
    a = v.clone().requires_grad_(True)
    b = v.clone().requires_grad_(True)
    ua = MF.unit_rows(a)
    ub = torch.nn.functional.normalize(b, dim=1)
    torch.testing.assert_close(ua, ub, rtol=1e-15, atol=1e-15)
    ua.backward(g)
    ub.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)
    w = torch.randn(6, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(MF.unit_rows, (w,))


def test_functional_regularizer_equals_reference():
    w = torch.randn(15, 6, dtype=F64, requires_grad=True)
    ours = MF.proxy_regularizer(w, 3)
    expected = reference.proxy_regularizer(w, 3)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-14)
    g1, = torch.autograd.grad(ours, w)
    g2, = torch.autograd.grad(expected, w)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_auto_on_cuda_prefers_fused_linear_for_large_similarity_tensors(monkeypatch):
    import types

    from mpa_kernels import backends
    from mpa_kernels._spec import LossSpec

    ready = types.SimpleNamespace(LOW_PRECISION=True, unavailable_reason=lambda device: None)
    for name in ("triton", "triton-linear"):
        monkeypatch.setitem(backends.sys.modules, backends._MODULES[name], ready)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    sop = LossSpec("mpa_ap", 11318, 2, 32.0, 0.1)
    large = LossSpec("mpa_ap", 100000, 4, 32.0, 0.1)
    assert backends.auto_backend(cuda, sop, batch_size=256, element_size=2) == "triton"
    # 2 * 1024 * 400000 * 2 bytes = 1.6 GiB of s and ds: never stored by the fused-linear kernels.
    assert backends.auto_backend(cuda, large, batch_size=1024, element_size=2) == "triton-linear"
    assert backends.auto_backend(cuda, large) == "triton"  # no shape given: no size rule


def _recording_backend(monkeypatch, name="triton-linear"):
    """Backend ``name`` replaced by one that records the keyword arguments it is called with."""
    import types

    from mpa_kernels import backends

    reference_backend = backends._load("reference")
    calls = []

    def similarity_loss(x_hat, w_hat, labels, spec, **options):
        calls.append(options)
        return reference_backend.similarity_terms(x_hat, w_hat, labels, spec).mean()

    fake = types.SimpleNamespace(__name__="recording", LOW_PRECISION=False,
                                 unavailable_reason=lambda device: None,
                                 OPTIONS=("deterministic", "filter_eps", "allow_tf32"),
                                 similarity_loss=similarity_loss)
    monkeypatch.setitem(backends.sys.modules, backends._MODULES[name], fake)
    return calls


def test_compute_options_are_per_call_and_per_module(monkeypatch):
    calls = _recording_backend(monkeypatch)
    x, labels = _batch()
    w = torch.randn(12, 8, dtype=F64)
    MF.mpa_ap_loss(x, labels, w, proxies_per_class=2, backend="triton-linear",
                   deterministic=True, filter_eps=1e-3)
    MF.mpa_ap_loss(x, labels, w, proxies_per_class=2, backend="triton-linear")
    # Two losses in one program with different settings.
    exact = mpa_kernels.MPALoss(6, 8, 2, backend="triton-linear", allow_tf32=False)
    filtered = mpa_kernels.MPALoss(6, 8, 2, backend="triton-linear", filter_eps=1e-4)
    exact(x, labels)
    filtered(x, labels)
    assert calls == [{"deterministic": True, "filter_eps": 1e-3}, {}, {"allow_tf32": False},
                     {"filter_eps": 1e-4}]
    # A backend without the knobs is not handed them (the reference would refuse the keywords).
    value = MF.mpa_ap_loss(x, labels, w, proxies_per_class=2, backend="reference",
                           deterministic=True, filter_eps=1e-3, allow_tf32=True)
    assert value.item() == pytest.approx(
        reference.mpa_ap_loss(x, labels, w, 2).item(), rel=1e-12)
    with pytest.raises(TypeError, match="deterministic must be True, False or None"):
        MF.mpa_ap_loss(x, labels, w, proxies_per_class=2, deterministic="yes")
    with pytest.raises(ValueError, match="filter_eps must be >= 0"):
        mpa_kernels.MPALoss(6, 8, filter_eps=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'determinstic'"):
        MF.mpa_loss(x, labels, w, proxies_per_class=2, determinstic=True)


def test_spec_is_the_one_description():
    loss_fn = mpa_kernels.MPADWLoss(6, 8, 3, alpha=16.0, tau=0.1)
    assert loss_fn.spec == mpa_kernels.LossSpec("mpa_dw", 6, 3, 16.0, 0.1, 0.1, "softmax", 0.1)
    loss_fn.alpha, loss_fn.similarity = 24, "max"
    assert (loss_fn.spec.alpha, loss_fn.spec.similarity) == (24.0, "max")
    assert "alpha=24.0" in repr(loss_fn) and "similarity='max'" in repr(loss_fn)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        loss_fn.gamma = 0.0
    with pytest.raises(ValueError, match="unknown similarity"):
        loss_fn.similarity = "min"
    for name in ("num_classes", "proxies_per_class", "embedding_size"):
        with pytest.raises(AttributeError, match=f"{name} of a MPADWLoss is fixed"):
            setattr(loss_fn, name, 2)
    assert (loss_fn.num_classes, loss_fn.proxies_per_class, loss_fn.embedding_size) == (6, 3, 8)


def test_proxy_nca_has_scale_not_alpha():
    x, labels = _batch()
    nca = mpa_kernels.ProxyNCALoss(6, 8, backend="reference", dtype=F64)
    assert "scale=9.0" in repr(nca) and "alpha" not in repr(nca)
    nca.scale = 3.0
    expected = reference.proxy_nca_loss(x, labels, nca.proxies.detach(), scale=3.0)
    assert nca(x, labels).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(AttributeError, match="ProxyNCALoss has no hyper-parameter 'alpha'.*scale"):
        nca.alpha = 18.0
    with pytest.raises(ValueError, match="scale must be > 0"):
        nca.scale = -1.0
    with pytest.raises(AttributeError, match="no hyper-parameter 'tau'"):
        mpa_kernels.ProxyAnchorLoss(6, 8).tau = 0.5


def test_state_dict_records_the_spec_and_refuses_another_loss(tmp_path):
    source = mpa_kernels.MPALoss(4, 8, proxies_per_class=3, alpha=20.0)
    torch.save(source.state_dict(), tmp_path / "loss.pt")
    state = torch.load(tmp_path / "loss.pt", weights_only=True)
    target = mpa_kernels.MPALoss(4, 8, proxies_per_class=3)
    target.load_state_dict(state)
    assert target.alpha == 20.0 and torch.equal(target.proxies, source.proxies)
    # The same 12 x 8 proxies, grouped differently: refused, not regrouped.
    with pytest.raises(ValueError, match="4 classes x 3 proxies.*6 classes x 2 proxies"):
        mpa_kernels.MPALoss(6, 8, proxies_per_class=2).load_state_dict(state)
    with pytest.raises(ValueError, match="'mpa' loss.*'mpa_ap'"):
        mpa_kernels.MPAAPLoss(4, 8, proxies_per_class=3).load_state_dict(state)


def test_device_path_validation_never_reads_a_value_on_the_host(monkeypatch):
    """On CUDA (and under torch.compile) the value checks are device-side assertions. Fake tensors
    have no values: any host read (``.item()``, ``bool(t)``, ``int(t)``) raises. With the checks
    on the device path a forward and backward of each family run through; the host path reads."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    def run():
        with FakeTensorMode():
            x = torch.randn(12, 8, requires_grad=True)
            w = torch.randn(18, 8, requires_grad=True)
            labels = torch.randint(0, 6, (12,))
            for fn in (MF.mpa_loss, MF.mpa_ap_loss):
                fn(x, labels, w, proxies_per_class=3, backend="reference").backward()
            MF.mpa_loss(x, labels, w, proxies_per_class=3, backend="reference", reduction="none")

    monkeypatch.setattr(MF, "value_checks_on_host", lambda t: False)
    run()
    monkeypatch.setattr(MF, "value_checks_on_host", lambda t: True)
    with pytest.raises(DataDependentOutputException):
        run()


def test_device_path_validation_asserts(monkeypatch):
    monkeypatch.setattr(MF, "value_checks_on_host", lambda t: False)
    x, labels = _batch()
    w = torch.randn(12, 8, dtype=F64)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 6\)"):
        MF.mpa_loss(x, labels + 1, w, proxies_per_class=2, backend="reference")
    w[5, 2] = float("nan")
    with pytest.raises(RuntimeError, match="proxies have a row that is not finite"):
        MF.mpa_loss(x, labels, w, proxies_per_class=2, backend="reference")


@pytest.mark.slow
def test_compile_fullgraph_of_model_and_loss_with_validation_on():
    """A model and a loss with the default call options (validate=True), compiled with
    fullgraph=True, on the CPU path that traces (backend="reference"; see the README for the
    "torch" backend). aot_eager: dynamo's capture and the autograd graph, without Inductor's
    code generation (minutes on this machine)."""
    net = torch.nn.Linear(16, 8).double()
    loss_fn = mpa_kernels.MPAAPLoss(5, 8, 3, backend="reference", dtype=F64)
    x, labels = torch.randn(20, 16, dtype=F64), torch.arange(20) % 5

    def step(x, labels):
        return loss_fn(net(x), labels)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    value = compiled(x, labels)
    value.backward()
    assert value.item() == pytest.approx(step(x, labels).item(), rel=1e-12)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 5\)"):
        compiled(x, labels + 1)


def test_readme_quick_start_runs_and_learns(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(block, "README.md (Quick start)", "exec"), namespace)
    assert namespace["loss"].item() < 1.0  # from about 10 at the first step
    assert "recall@1" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "triton-linear"])
def test_backends_normalise_each_input_once(backend):
    """Past the checks (validate=False), a row of zeros gets the gradient of one clamped
    normalisation, g / eps, on every backend, as the plain oracle gives it (the reference backend
    used to normalise the normalised rows again: 1e24 against the others' 1e12)."""
    x, labels = _batch(dtype=torch.float32)
    x[4] = 0.0
    w = torch.randn(18, 8)
    oracle_x = x.double().requires_grad_(True)
    reference.mpa_ap_loss(oracle_x, labels, w.double(), 3).backward()
    xb = x.clone().requires_grad_(True)
    MF.mpa_ap_loss(xb, labels, w, proxies_per_class=3, backend=backend, validate=False).backward()
    expected = oracle_x.grad[4].abs().max().item()
    assert 1e10 < expected < 1e14
    assert xb.grad[4].abs().max().item() == pytest.approx(expected, rel=1e-3)
