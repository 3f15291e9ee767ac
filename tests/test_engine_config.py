"""DeepSpeed config building: shipped JSONs load, the run config fills what it owns, 'auto' is refused."""
import json

import pytest

from lvlm_region.train.engine import (DS_CONFIG_DIR, STALE_BUILD_LOCK_S, build_ds_config, cpu_threads, lr_lambda,
                                stale_build_locks)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_configs(name):
    raw = json.loads((DS_CONFIG_DIR / name).read_text())
    assert raw["zero_optimization"]["overlap_comm"] is False  # NaN/zero-loss reports with LLaVA-style runs
    cfg = build_ds_config(2, str(DS_CONFIG_DIR / name), micro_batch=4, grad_accum=3, grad_clip=1.0,
                          precision="bf16")
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 12 and cfg["gradient_clipping"] == 1.0 and cfg["bf16"] == {"enabled": True}
    assert "fp16" not in cfg


def test_zero_flag_picks_the_file():
    assert build_ds_config(3, None, 1, 1, 1.0, "fp32")["zero_optimization"]["stage"] == 3
    assert build_ds_config(2, None, 1, 1, 1.0, "fp32")["zero_optimization"]["stage"] == 2


def test_conflicts_and_auto_are_refused(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 disagrees with the run config \\(4\\)"):
        build_ds_config(2, str(p), 4, 1, 1.0, "fp32")
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                             "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ValueError, match="'auto' is not resolved for zero_optimization.reduce_bucket_size"):
        build_ds_config(2, str(p), 4, 1, 1.0, "fp32")

    p.write_text(json.dumps({"zero_optimization": {"stage": 3},
                             "activation_checkpointing": {"partition_activations": True}}))
    with pytest.raises(ValueError, match="'activation_checkpointing' configures DeepSpeed's checkpointing API, "
                                         "which transformers models never call.*pass --grad-ckpt"):
        build_ds_config(3, str(p), 4, 1, 1.0, "fp32")


def test_warmup_cosine_schedule():
    f = lr_lambda(total_steps=10, warmup_steps=2)
    # warmup (s+1)/2, then 0.5 * (1 + cos(pi * (s - 2) / 8)); reaches 0 at s = 10, after the last step
    assert [round(f(s), 4) for s in range(11)] == [0.5, 1.0, 1.0, 0.9619, 0.8536, 0.6913, 0.5, 0.3087,
                                                    0.1464, 0.0381, 0.0]


def test_precision_follows_what_deepspeeds_accelerator_supports():
    from deepspeed.accelerator import get_accelerator

    from lvlm_region.train.engine import resolve_precision
    acc = get_accelerator()
    assert resolve_precision("auto") == "fp32" and resolve_precision("fp32") == "fp32"  # CPU: fp32 unless asked
    assert acc.is_bf16_supported() and resolve_precision("bf16") == "bf16"
    if acc.is_fp16_supported():  # a CPU with AVX512-FP16
        assert resolve_precision("fp16") == "fp16"
    else:
        with pytest.raises(ValueError, match=r"--precision fp16: DeepSpeed's cpu accelerator on this machine does not "
                                             r"support fp16 \(fp16 needs a GPU, or a CPU with AVX512-FP16\); use bf16 "
                                             r"or fp32"):
            resolve_precision("fp16")


def test_the_precision_sections_own_settings_are_kept(tmp_path):
    """--precision decides which section is on; fp16's loss-scaling settings in the JSON survive (they were
    dropped before, silently)."""
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
                             "fp16": {"enabled": False, "initial_scale_power": 12, "loss_scale_window": 500}}))
    fp16 = build_ds_config(3, str(p), 1, 1, 1.0, "fp16")
    assert fp16["fp16"] == {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 500}
    assert "bf16" not in fp16
    bf16 = build_ds_config(3, str(p), 1, 1, 1.0, "bf16")
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    fp32 = build_ds_config(3, str(p), 1, 1, 1.0, "fp32")
    assert "bf16" not in fp32 and "fp16" not in fp32


def test_cpu_ranks_share_the_cores_unless_omp_num_threads_is_set():
    assert cpu_threads({"LOCAL_SIZE": "2"}, 2) == 1  # the deepspeed launcher's ranks per node
    assert cpu_threads({"LOCAL_WORLD_SIZE": "4"}, 16) == 4  # torchrun's
    assert cpu_threads({"LOCAL_SIZE": "8"}, 2) == 1  # never below one
    assert cpu_threads({}, 2) == 2  # a plain `python` run: one rank, every core
    assert cpu_threads({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, 2) is None  # the user's (or numactl binding's)


def test_a_stale_jit_build_lock_is_found_a_fresh_one_is_not(tmp_path):
    """A DeepSpeed op build killed mid-way leaves torch's lock file; launches would wait on it forever."""
    import os
    import time
    now = time.time()
    assert stale_build_locks(str(tmp_path), now) is None
    fresh = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    fresh.parent.mkdir(parents=True)
    fresh.touch()
    assert stale_build_locks(str(tmp_path), now) is None  # a build running now
    stale = tmp_path / "deepspeed_shm_comm" / "lock"  # the TORCH_EXTENSIONS_DIR layout: root/<op>/lock
    stale.parent.mkdir()
    stale.touch()
    os.utime(stale, (now - STALE_BUILD_LOCK_S - 60, now - STALE_BUILD_LOCK_S - 60))
    path, age = stale_build_locks(str(tmp_path), now)
    assert path == str(stale) and age == pytest.approx(STALE_BUILD_LOCK_S + 60, abs=1)
