"""The timing harness's pure parts: steady-state sums, resume of the sums, the memory estimate by hand."""
import pytest

from lvlm_region.infra import timing


def times(step, data=0.1, fwd=0.2, bwd=0.3, opt=0.1):
    return {"step": step, "data": data, "forward": fwd, "backward": bwd, "optimizer": opt}


def test_totals_skip_warmup_and_restore_across_sessions():
    t = timing.Totals(warmup=2)
    for s in (5.0, 3.0, 1.0, 1.0):  # two slow warm-up steps, then two steady ones
        t.add(times(s), tokens=100, samples=4, images=3, flops_model=2e12, flops_hw=3e12)
    out = t.summary(world=2, peak=1e12)
    assert out["steady_steps"] == 2 and out["step_seconds"] == 1.0
    assert out["tokens_per_s_per_gpu"] == 100 * 2 / 2.0 / 2
    assert out["samples_per_s"] == 4.0 and out["images_per_s"] == 3.0
    assert out["mfu"] == pytest.approx(4e12 / (2.0 * 2 * 1e12)) and out["hfu"] == pytest.approx(6e12 / 4e12)
    assert out["phase_seconds"]["backward"] == pytest.approx(0.3)
    resumed = timing.Totals(warmup=1)
    resumed.restore(t.state_dict())
    resumed.add(times(9.0), 100, 4, 3, 2e12, 3e12)  # this session's warm-up: skipped
    resumed.add(times(1.0), 100, 4, 3, 2e12, 3e12)
    assert resumed.summary(2, 1e12)["steady_steps"] == 3 and resumed.seconds == 3.0
    # a checkpoint of an earlier version, which had no switch phase: it starts at 0
    earlier = t.state_dict()
    del earlier["phases"]["switch"]
    again = timing.Totals(warmup=0)
    again.restore(earlier)
    again.add({**times(1.0), "switch": 0.5}, 100, 4, 3, 2e12, 3e12)
    assert again.phases["switch"] == 0.5 and again.phases["backward"] == pytest.approx(0.9)


def test_model_states_by_hand():
    # Llama-3-8B-sized full tuning in bf16 on one rank: 2 (weight) + 6 (16-bit and fp32 gradient) + 12 (fp32 master,
    # m, v) = 20 B/param, as DeepSpeed's ZeRO-2 estimator counts it (2 N + 18 N / world)
    full = timing.model_states(8_000_000_000, 8_000_000_000, zero_stage=2, world=1, precision="bf16",
                               offload_optimizer=False)
    assert full["total_on_device"] == 160e9
    # 8 of 32 layers trainable (~1.75B), ZeRO-2 on 8 ranks: full 16-bit weights, the trainable state split 8 ways
    sel = timing.model_states(8_000_000_000, 1_750_000_000, zero_stage=2, world=8, precision="bf16",
                              offload_optimizer=False)
    assert sel == {"weights": 16e9, "gradients": 1_750_000_000 * 6 / 8, "optimizer": 1_750_000_000 * 12 / 8,
                   "gather_buffer": 0, "optimizer_on_device": 1_750_000_000 * 12 / 8,
                   "total_on_device": 16e9 + 1_750_000_000 * 18 / 8}
    # ZeRO-3: weights partitioned too, the fp32 gradient partition only, the largest module's gather buffers
    z3 = timing.model_states(1000, 100, zero_stage=3, world=4, precision="bf16", offload_optimizer=False, largest=50)
    assert z3["total_on_device"] == 4 * 50 + (2 * 1000 + 16 * 100) / 4
    off = timing.model_states(100, 10, zero_stage=3, world=2, precision="fp32", offload_optimizer=True, largest=5)
    assert off["weights"] == 200 and off["optimizer"] == 40 and off["total_on_device"] == 200 + 2 * 4 * 5


def test_cpu_peak_is_measured():
    peak, source = timing.peak_flops()
    assert source == "measured fp32 matmul on this CPU" and 1e8 < peak < 1e14
    assert timing.peak_flops(312.0) == (312e12, "--peak-tflops")


def test_gpu_peaks_by_device_name():
    assert timing.peak_for_gpu("NVIDIA A100-SXM4-80GB") == (312e12, "bf16 data sheet (A100)")
    assert timing.peak_for_gpu("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert timing.peak_for_gpu("NVIDIA H200")[0] == 989e12
    with pytest.raises(ValueError, match="no peak FLOP/s known for GPU 'Tesla T4'.*pass --peak-tflops"):
        timing.peak_for_gpu("Tesla T4")
