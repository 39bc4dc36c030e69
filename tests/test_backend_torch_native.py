"""The ``"torch"`` backend's native loops (``torch_native.cpp``): built where a compiler is, equal
to the eager ops they replace, and a fallback to those ops that says why.

tests/test_backend_torch.py runs every reference comparison with both paths; here the two are
held to each other at a shape with many chunks of many classes, where every buffer of the sweep
is in use, and the loader's behaviour without a build is checked."""

import shutil
import warnings

import pytest
import torch

from mpa_kernels import functional as MF
from mpa_kernels.backends import _native, torch_chunked
from tests.test_backend_torch import _assert_matches, _inputs, _value_and_grads

LOSSES = {
    "mpa": MF.mpa_loss,
    "mpa_dw": MF.mpa_dw_loss,
    "mpa_ap": MF.mpa_ap_loss,
    "soft_triple": MF.soft_triple_loss,
    "proxy_anchor": MF.proxy_anchor_loss,
    "proxy_nca": MF.proxy_nca_loss,
}
ONE_PROXY = {"proxy_anchor", "proxy_nca"}
CAN_BUILD = shutil.which("c++") is not None and shutil.which("ninja") is not None


def test_native_loops_are_built_where_a_compiler_is():
    """Where a C++ compiler and ninja are, the loops build; a failed build would otherwise only
    show as a slower backend."""
    if not CAN_BUILD:
        pytest.skip("no C++ compiler or ninja on this machine: the eager ops run")
    assert _native.module() is not None, _native.status()
    assert _native.status().startswith("native")


def _needs_native():
    if _native.module() is None:
        pytest.skip(f"the native loops are not available here: {_native.status()}")


def _run(loss, similarity, regime, dtype, native, monkeypatch):
    monkeypatch.setattr(torch_chunked, "NATIVE", native)
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(torch_chunked, "KEEP_IN_GRADIENT", regime == "gradient")
    monkeypatch.setattr(torch_chunked, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(torch_chunked, "ROW_BLOCK_BYTES", 1 << 40 if regime == "buffer" else 1)
    k = 1 if loss in ONE_PROXY else 10
    # d wide enough that the gradient regime keeps the GEMM output too.
    x, labels, w = _inputs(40, 37, k, "random", dtype, seed=7, d=100)
    kwargs = {} if loss in ONE_PROXY else {"similarity": similarity, "proxies_per_class": k}
    return _value_and_grads(LOSSES[loss], x, labels, w, "torch", **kwargs)


# The column-wise losses have one regime (one sweep); the one-proxy losses no similarity mode.
CASES = [(loss, similarity, regime)
         for loss in LOSSES
         for similarity in (["softmax"] if loss in ONE_PROXY else ["softmax", "max", "mean"])
         for regime in (["gradient"] if loss in ("mpa", "proxy_anchor")
                        else ["gradient", "buffer", "recompute"])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("loss, similarity, regime", CASES)
def test_native_equals_eager(loss, similarity, regime, dtype, monkeypatch):
    _needs_native()
    native = _run(loss, similarity, regime, dtype, True, monkeypatch)
    eager = _run(loss, similarity, regime, dtype, False, monkeypatch)
    # The same formulas in another order of rounding (vectorised sums, fused multiply-adds).
    _assert_matches(native, eager, 1e-12 if dtype == torch.float64 else 2e-5)


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as before its first call (its result is cached for the process)."""
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_reason", None)


def test_switched_off_by_the_environment(fresh_loader, monkeypatch):
    monkeypatch.setenv("MPA_KERNELS_NATIVE", "0")
    monkeypatch.setattr(_native, "build", lambda: pytest.fail("must not build"))
    assert _native.module() is None
    assert _native.status() == "eager: switched off by MPA_KERNELS_NATIVE=0"


def test_a_failed_build_warns_once_and_falls_back(fresh_loader, monkeypatch):
    def fail():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.delenv("MPA_KERNELS_NATIVE", raising=False)
    monkeypatch.setattr(_native, "build", fail)
    monkeypatch.setattr(torch_chunked, "NATIVE", True)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4 * 3, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.warns(RuntimeWarning, match="could not be built .*Ninja is required"):
        value = MF.mpa_loss(x, labels, w, proxies_per_class=3, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        again = MF.mpa_loss(x, labels, w, proxies_per_class=3, backend="torch")
    reference = MF.mpa_loss(x, labels, w, proxies_per_class=3, backend="reference")
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    assert again.item() == value.item()
    assert _native.status().startswith("eager: could not be built (RuntimeError: Ninja")


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("loss", ["mpa_dw", "mpa_ap", "soft_triple"])
def test_gram_matrices_kept_in_the_gradient_are_read_before_it_is_written(loss, n, monkeypatch):
    """With few rows the row-wise sweep keeps the chunk's Gram matrices in the chunk's rows of the
    gradient, where the finish writes: every class's terms must be formed from them first (a
    finish that wrote class by class once corrupted later classes' matrices)."""
    monkeypatch.setattr(torch_chunked, "NATIVE", True)
    monkeypatch.setattr(torch_chunked, "KEEP_IN_GRADIENT", True)
    monkeypatch.setattr(torch_chunked, "DEFAULT_CHUNK_ELEMENTS", 40)
    x, labels, w = _inputs(n, 9, 3, "random", torch.float64, seed=3, d=16)
    got, want = (_value_and_grads(LOSSES[loss], x, labels, w, backend, proxies_per_class=3)
                 for backend in ("torch", "reference"))
    _assert_matches(got, want, 1e-10)


def _mpa_step(x, labels, w, scale=1.0):
    (MF.mpa_loss(x, labels, w, proxies_per_class=4, backend="torch") * scale).backward()


def _big_inputs():
    """Proxies of 1 MiB and more, whose gradient comes from the kept buffers."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 512, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(64 * 4, 512, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 64, (24,), generator=gen)
    return x, labels, w


def test_the_gradient_buffer_is_kept_for_the_next_call_and_released():
    """Once the proxies' gradient is freed (zero_grad), the next call's gradient is the same
    memory, with the same values as a fresh buffer gives; release_buffers frees what is kept."""
    _needs_native()
    torch_chunked.release_buffers()
    x, labels, w = _big_inputs()
    _mpa_step(x, labels, w)
    first, ptr = w.grad.clone(), w.grad.data_ptr()
    w.grad = x.grad = None
    assert _native.module().kept_buffer_bytes() == w.numel() * w.element_size()
    _mpa_step(x, labels, w)
    assert w.grad.data_ptr() == ptr and _native.module().kept_buffer_bytes() == 0
    torch.testing.assert_close(w.grad, first, rtol=0, atol=0)
    w.grad = None
    assert torch_chunked.release_buffers() == w.numel() * w.element_size()
    assert _native.module().kept_buffer_bytes() == 0


def test_a_gradient_still_held_is_not_reused(monkeypatch):
    """A gradient the caller still holds (accumulation over steps, a reference kept) is never the
    next call's buffer: accumulating two steps gives twice one step's gradient, and the held
    tensor keeps its values."""
    _needs_native()
    x, labels, w = _big_inputs()
    _mpa_step(x, labels, w)
    held = w.grad
    snapshot = held.clone()
    _mpa_step(x, labels, w)  # accumulates into w.grad, which is held
    torch.testing.assert_close(w.grad, 2 * snapshot)
    w.grad = None
    _mpa_step(x, labels, w)
    assert w.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, 2 * snapshot)
    monkeypatch.setattr(torch_chunked, "REUSE_GRADIENT_BUFFERS", False)
    fresh = w.grad.clone()
    w.grad = None
    _mpa_step(x, labels, w)
    torch.testing.assert_close(w.grad, fresh, rtol=0, atol=0)


def test_a_scaled_loss_backward_twice_keeps_its_saved_gradient():
    """With a grad_output other than 1 the gradient is scaled into a buffer of its own, so that a
    second backward of the same graph (retain_graph) scales the saved one again, not its product."""
    _needs_native()
    x, labels, w = _big_inputs()
    loss = MF.mpa_loss(x, labels, w, proxies_per_class=4, backend="torch") * 3.0
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    w.grad = None
    loss.backward()
    torch.testing.assert_close(w.grad, once, rtol=0, atol=0)


def test_memory_measured_through_the_profiler_counts_a_kept_gradient_buffer():
    """A gradient from the kept buffers is reported to the profiler as torch's own allocator
    reports its tensors, so that the benchmarks' peak memory counts it, from a fresh buffer or a
    reused one alike."""
    _needs_native()
    from benchmarks.measure import peak_bytes

    x, labels, w = _big_inputs()
    gradient = w.numel() * w.element_size()
    for _ in range(2):  # the second call reuses the first one's buffer
        w.grad = x.grad = None

        def forward():
            return MF.mpa_loss(x, labels, w, proxies_per_class=4, backend="torch")

        _, peak = peak_bytes(forward, torch.Tensor.backward, torch.device("cpu"))
        assert peak >= gradient
    assert w.grad is not None


def test_kept_buffers_are_bounded_and_serve_smaller_gradients():
    """Gradients of varying sizes (proxies sampled afresh every step) keep at most the two largest
    blocks, and a gradient of half a kept block's size or more reuses it."""
    _needs_native()
    torch_chunked.release_buffers()
    sizes = [(n, 512) for n in (600, 900, 700, 1200, 800, 1000)]  # 1.2-2.4 MiB in fp32
    for size in sizes:
        buffer = torch_chunked._gradient_buffer(torch.empty(size))
        assert buffer.shape == size and buffer.is_contiguous()
        del buffer
    bytes_of = [n * 512 * 4 for n, _ in sizes]
    # 700 reused the 900 block, 800 and 1000 the 900 and 1200 ones: two blocks are kept.
    kept = _native.module().kept_buffer_bytes()
    assert kept == (900 + 1200) * 512 * 4 and kept <= 2 * max(bytes_of)
    largest = torch_chunked._gradient_buffer(torch.empty(1200, 512))
    ptr = largest.data_ptr()
    del largest
    smaller = torch_chunked._gradient_buffer(torch.empty(1100, 512))  # only 1200 serves it
    assert smaller.data_ptr() == ptr
    smaller.fill_(2.0)
    assert float(smaller.sum()) == 2.0 * 1100 * 512
    del smaller
    assert torch_chunked.release_buffers() == kept


def test_the_kept_buffers_belong_to_one_build():
    """Two builds of the loops can be loaded in one process (the benchmark against another
    revision); a function-local static with external linkage would be one object for both (GCC
    makes it a unique global symbol), and a build would use the other's pool, of another layout."""
    _needs_native()
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    import subprocess

    symbols = subprocess.run([readelf, "-Ws", "--demangle", _native.module().__file__],
                             capture_output=True, text=True, check=True).stdout
    shared = [line for line in symbols.splitlines() if "UNIQUE" in line and "BufferPool" in line]
    assert not shared, shared
