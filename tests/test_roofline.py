"""The roofline model's arithmetic, against numbers worked out by hand for one shape: N = 256,
C = 11318, K = 2, d = 512 (SOP-like), bf16, on the H100 SXM and H200 figures."""

import pytest
import torch

from benchmarks import roofline as R
from benchmarks.shapes import Shape

SOP = Shape("sop256", 256, 11318, 2, 512)
# N * C * K = 256 * 22636 scores; one GEMM over them is 2 * 5,794,816 * 512 FLOP.
SCORES = 5_794_816
GEMM_FLOPS = 5_933_891_584
# x (256 x 512), w (22636 x 512) and s (256 x 22636), 2 bytes each.
X_BYTES, W_BYTES, S_BYTES = 262_144, 23_179_264, 11_589_632


def test_gpu_figures():
    h100, h200 = R.GPUS["h100"], R.GPUS["h200"]
    # 16 SFU results per SM per clock x 132 SMs x 1.83 GHz.
    assert h100.mufu_per_s == pytest.approx(3.86496e12)
    assert h100.gemm_peak("bfloat16") == 989.4e12
    assert h100.gemm_peak("float32") == 66.9e12
    assert h100.gemm_peak("float32", tf32=True) == 494.7e12
    assert h100.hbm_bytes_per_s == 3.35e12 and h200.hbm_bytes_per_s == 4.8e12
    assert h200.peak_flops == h100.peak_flops and h200.sources
    assert R.gpu_for_device_name("NVIDIA H100 80GB HBM3") == "h100"
    assert R.gpu_for_device_name("NVIDIA H200") == "h200"
    assert R.gpu_for_device_name("NVIDIA A100-SXM4-80GB") is None


def test_floor_by_hand():
    fwd, bwd = R.provider_kernels("floor", "mpa", SOP, "bfloat16")
    (s,) = fwd
    assert s.flops == GEMM_FLOPS
    assert s.bytes == X_BYTES + W_BYTES + S_BYTES == 35_031_040
    # Memory-bound on both: 35,031,040 B / 3.35 TB/s = 10.457 us > 5.9934e9 / 989.4e12 = 5.997 us.
    p = R.predict("floor", "mpa", SOP, "bfloat16", "h100")
    assert p["forward"]["time_s"] == pytest.approx(35_031_040 / 3.35e12)
    assert p["forward"]["bound"] == "memory"
    # ds w and ds^T x each read ds and one operand and write the other's gradient: the same bytes.
    assert [k.bytes for k in bwd] == [35_031_040, 35_031_040]
    assert p["forward_backward"]["time_s"] == pytest.approx(3 * 35_031_040 / 3.35e12)
    h200 = R.predict("floor", "mpa", SOP, "bfloat16", "h200")
    assert h200["forward"]["time_s"] == pytest.approx(35_031_040 / 4.8e12)  # 7.30 us > 6.00 us
    # fp32 without TF32: 5.9339e9 FLOP at 66.9 TFLOP/s = 88.7 us, over the 70 MB at 20.9 us.
    fp32 = R.predict("floor", "mpa", SOP, "float32", "h100")
    assert fp32["forward"]["time_s"] == pytest.approx(GEMM_FLOPS / 66.9e12)
    assert fp32["forward"]["bound"] == "compute"


def test_special_function_counts():
    # Softmax over K (an exp and a division per padded score) plus the per-pair exps of the
    # log-sum-exps: MPA forward (2 * 2 + 2) / 2 = 3 per score, MPA-DW's softplus adds 2 per pair.
    assert R.mufu_per_score("mpa", 2, "forward", fused=False) == 3.0
    assert R.mufu_per_score("mpa_dw", 2, "forward", fused=False) == 3.5
    assert R.mufu_per_score("mpa_dw", 2, "forward", fused=True) == 2.5
    assert R.mufu_per_score("mpa_ap", 2, "backward", fused=True) == 2.5
    # K = 10 tiles are 16 wide: (2 * 16 + 2) / 10.
    assert R.mufu_per_score("mpa", 10, "forward", fused=False) == pytest.approx(3.4)
    assert [R.k_pad(k) for k in (1, 2, 3, 4, 10, 16)] == [1, 2, 4, 4, 16, 16]


def test_triton_loss_kernel_is_exp_bound_on_h100():
    fwd, _ = R._core_triton(SOP.n, SOP.c * SOP.k, SOP.d, "mpa", SOP.k, "bfloat16")
    gemm, loss, _merge = fwd
    assert gemm.bytes == 35_031_040
    splits, owned = R._forward_splits(SOP.n, SOP.c, SOP.k, "mpa")
    assert loss.bytes == S_BYTES + 8 * 256 + 8 * splits * owned
    assert loss.mufu == 3 * SCORES
    t = loss.times(R.GPUS["h100"])
    # 17,384,448 SFU operations / 3.86496e12 per s = 4.498 us, reading s takes 3.460 us (and
    # writing the 3 x 11,318 split partials 0.08 us more).
    assert t["exp"] == pytest.approx(3 * SCORES / 3.86496e12)
    assert t["memory"] == pytest.approx((S_BYTES + 2048 + 8 * splits * owned) / 3.35e12)
    assert loss.time(R.GPUS["h100"]) == t["exp"]


@pytest.mark.parametrize("loss", ["mpa", "mpa_dw"])
@pytest.mark.parametrize("n, c, k", [(256, 11318, 2), (32, 11318, 2), (180, 100, 10),
                                     (4096, 100000, 4), (1, 7, 3)])
def test_forward_splits_are_the_launchers(loss, n, c, k, monkeypatch):
    """The model's split count is the one the over-s forward launches with on a 132-SM GPU."""
    from mpa_kernels.kernels import launch
    from mpa_kernels.kernels.similarity import BLOCK_N, TILE_COLUMNS

    monkeypatch.setattr(launch, "target_programs", lambda device: 4 * 132)
    row_blocks, class_blocks = -(-n // BLOCK_N), -(-c // max(1, TILE_COLUMNS // R.k_pad(k)))
    owned, swept = (class_blocks, row_blocks) if loss == "mpa" else (row_blocks, class_blocks)
    splits, _ = launch.plan_splits(owned, swept, torch.device("cpu"))
    assert R._forward_splits(n, c, k, loss) == (splits, c if loss == "mpa" else n)


def test_linear_counts_gemm_equivalents():
    n, m, d = SOP.n, SOP.c * SOP.k, SOP.d
    for deterministic, backward_gemms in ((False, 3), (True, 4)):
        fwd, bwd = R._core_linear(n, m, d, "mpa_dw", SOP.k, "bfloat16", deterministic)
        assert sum(k.flops for k in fwd) == GEMM_FLOPS
        assert sum(k.flops for k in bwd) == backward_gemms * GEMM_FLOPS
    # K = 10 is padded to 16 proxies a class in the tiles: 1.6x the dot work.
    fwd, _ = R._core_linear(180, 1000, 512, "mpa", 10, "bfloat16", False)
    assert fwd[0].flops == 2 * 180 * 1600 * 512


def test_pass_time_sums_kernels_and_takes_the_launch_floor():
    g = R.GPUS["h100"]
    tiny = [R.Kernel("a", bytes=1000.0), R.Kernel("b", bytes=1000.0)]
    p = R.pass_time(tiny, g)
    assert p["bound"] == "launch" and p["time_s"] == 2 * R.HOST_SECONDS_PER_LAUNCH
    big = [R.Kernel("read", bytes=3.35e9), R.Kernel("gemm", flops=989.4e9, dtype="bfloat16")]
    p = R.pass_time(big, g)
    assert p["time_s"] == pytest.approx(2e-3) and p["device_s"] == pytest.approx(2e-3)


def test_op_counter_bytes_and_flops():
    a = torch.empty(4, 8, device="meta")
    w = torch.empty(3, 8, device="meta")
    with R.OpCounter() as c:
        b = a * 2  # reads 128 B, writes 128 B
        b.view(8, 4)  # a view: no kernel
        a @ w.T  # (4 x 8) @ (8 x 3): 192 FLOP; reads a and w once each, writes 48 B
        w @ w.T  # one storage seen twice is read once
    mul, mm, gram = c.kernels
    assert (mul.name, mul.bytes) == ("mul", 256)
    assert (mm.flops, mm.bytes) == (2 * 4 * 8 * 3, 128 + 96 + 48)
    assert gram.bytes == 96 + 36


def test_reference_counted_on_meta_stores_s_in_fp32():
    fwd, bwd = R.count_ops("mpa", SOP, "bfloat16", "reference")
    # The reference computes half inputs in fp32: its s GEMM reads fp32 copies and writes fp32 s.
    (s_gemm, *_) = [k for k in fwd if k.flops]
    assert s_gemm.dtype == "float32" and s_gemm.flops == GEMM_FLOPS
    assert sum(k.bytes for k in fwd) > 4 * 4 * SCORES  # several fp32 passes over s
    assert sum(k.flops for k in bwd) >= 2 * GEMM_FLOPS


def test_front_end_has_no_similarity_work():
    fwd, bwd = R.count_ops("mpa", SOP, "bfloat16", "front-end")
    # Normalising w reads it and writes w_hat; the only GEMMs are the regulariser's batched
    # (K x d) @ (d x K) per class, forward and two backward: 3 * 2 * 11318 * 2 * 2 * 512 FLOP.
    assert sum(k.bytes for k in fwd) >= 2 * W_BYTES
    assert sum(k.flops for k in fwd + bwd) == 139_075_584


def test_every_provider_predicts_in_order():
    times = {p: R.predict(p, "mpa", SOP, "bfloat16", "h100")["forward_backward"]["time_s"]
             for p in R.PROVIDERS}
    assert times["floor"] == min(times.values())
    assert times["triton"] < times["reference"]
    assert times["triton-linear"] <= times["triton-linear-det"]
    assert R.predict("torch", "mpa", Shape("big", 1024, 100000, 4), "bfloat16", "h100") is None


def test_crossover():
    # fp32 on the CUDA cores: the fused kernels' fourth GEMM never pays for the s traffic saved.
    assert R.crossover_batch(100000, 4, 512, "float32", "h100") is None
    # bf16, K a power of two: per score the fused kernels save 6 passes of 2 bytes over s
    # (3.6 ps at 3.35 TB/s) for one GEMM-equivalent (1.0 ps); the fp32 gradient buffers over
    # C*K x d cost a fixed amount, so from some batch size on they are faster.
    n = R.crossover_batch(100000, 4, 512, "bfloat16", "h100")
    assert n is not None and R.linear_gain_s(Shape("x", n, 100000, 4), "bfloat16", "h100") > 0
    assert R.linear_gain_s(Shape("x", n // 2, 100000, 4), "bfloat16", "h100") <= 0
