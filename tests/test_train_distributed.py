"""Both stages on two DeepSpeed CPU ranks (gloo), ZeRO-2 and ZeRO-3, through the real training loop.

After training: every frozen tensor is bit-identical to the run's starting weights, every trainable one
changed, and the saved checkpoint reloads with plain transformers to exactly the engine's weights.
"""
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import deepspeed_cmd, run

FAST = ["--max-steps", "3", "--micro-batch", "4", "--num-workers", "0", "--log-every", "1",
        "--eval-max-samples", "6"]


def train_and_report(tmp_path, stage, name, *flags):
    out, report = tmp_path / name, tmp_path / f"{name}.json"
    res = run(deepspeed_cmd(2, "tests/helpers/train_check.py", stage, str(report), "--",
                            "--output-dir", str(out), *FAST, *flags))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, json.loads(report.read_text()), res.stdout


def check(report, trainable_pattern):
    params = report["params"]
    want = {n for n in params if re.match(trainable_pattern, n)}
    assert want, "pattern matched nothing"
    assert {n for n, p in params.items() if p["trainable"]} == want
    assert {n for n, p in params.items() if p["changed"]} == want  # frozen: bit-identical; trained: changed
    assert all(p["reload_equal"] for p in params.values())
    assert report["summary"]["world_size"] == 2
    assert report["export_names"]["equal"], report["export_names"]  # the names save_pretrained writes, any ZeRO


def check_size_estimate(out: Path, report: dict) -> None:
    """The first checkpoint's free-space check asks for about what a checkpoint writes (all ranks together)."""
    ckpt = out / "checkpoints" / "step-00000003"
    written = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert 0.9 * written <= report["checkpoint_bytes_estimate"] <= 1.1 * written, (written, report)


@pytest.fixture(scope="module")
def stage1(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    return train_and_report(tmp, "pretrain", "pre_z2", "--zero", "2", "--attn", "flash_attention_2",
                            "--save-every", "3")


def test_stage1_zero2_trains_only_the_projector(stage1):
    out, report, stdout = stage1
    check(report, r"model\.multi_modal_projector\.")
    check_size_estimate(out, report)
    assert report["summary"]["region"]["layers"] == []
    assert "optimizer holds exactly the 4 intended parameter tensors" in stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(x["loss"] > 0 for x in lines)
    for x in lines:  # the harness: phases inside the step, work and MFU from the FLOP model
        phases = x["data_s"] + x["forward_s"] + x["backward_s"] + x["optimizer_s"]
        assert 0 < phases <= x["step_s"] and 0 < x["mfu"] < 1 and x["tflops_per_step"] > 0
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "complete" and run_json["parameters"]["projector"]["trainable"] > 0
    assert set(run_json["versions"]) >= {"torch", "deepspeed", "transformers"}
    # The two CPU ranks share this machine's cores instead of each starting one thread per core.
    assert [r["cpu_threads"] for r in run_json["ranks"]] == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
    assert run_json["attn"] == "sdpa" and "--attn: flash_attention_2 needs a GPU; using sdpa on CPU" in stdout
    t = run_json["timing"]
    assert t["steady_steps"] == 2 and t["warmup_steps_per_session"] == 1  # step 1 is warm-up
    assert t["peak_source"] == "measured fp32 matmul on this CPU" and 0 < t["mfu"] < 1


def test_stage1_zero3(demo_dir, tmp_path):
    out, report, _ = train_and_report(tmp_path, "pretrain", "pre_z3", "--zero", "3", "--save-every", "3")
    check(report, r"model\.multi_modal_projector\.")
    check_size_estimate(out, report)


def test_stage2_zero2_uniform25_from_stage1(demo_sft_data, stage1, tmp_path):
    pre_out = stage1[0]
    out, report, stdout = train_and_report(tmp_path, "sft", "sft_z2", *demo_sft_data, "--zero", "2", "--region",
                                           "uniform25",
                                           "--init", str(pre_out))
    check(report, r"model\.multi_modal_projector\.|model\.language_model\.layers\.(0|7)\.")
    assert report["summary"]["region"]["layers"] == [0, 7]
    ev = report["summary"]["eval"]
    assert ev["samples"] == 6 and 0 <= ev["accuracy"] <= 1 and ev["loss"] > 0
    assert "loaded 4 projector tensors" in stdout


def test_stage2_zero3_starts_from_stage1_projector(demo_sft_data, stage1, tmp_path):
    # The projector is frozen here, so "unchanged against the start" proves the start was stage 1's projector
    # (the start is built from the base model with stage 1's projector.safetensors swapped in).
    pre_out = stage1[0]
    _, report, _ = train_and_report(tmp_path, "sft", "sft_z3", *demo_sft_data, "--zero", "3", "--region",
                                    "layers:1,5-projector",
                                    "--init", str(pre_out))
    check(report, r"model\.language_model\.layers\.(1|5)\.")
    assert report["summary"]["eval"]["samples"] == 6


def test_a_sublayer_region_trains_exactly_those_modules_under_zero3(demo_sft_data, tmp_path):
    """uniform25.mlp on ZeRO-3, 2 ranks: the MLPs of layers 0 and 7 and the projector change, their attention and
    norms stay bit-identical; the FLOP model counts the frozen attention's weight gradients as skipped."""
    out, report, stdout = train_and_report(tmp_path, "sft", "mlp_z3", *demo_sft_data, "--zero", "3", "--region",
                                           "uniform25.mlp")
    check(report, r"model\.multi_modal_projector\.|model\.language_model\.layers\.(0|7)\.mlp\.")
    assert report["summary"]["region"]["sublayer"] == "mlp" and report["summary"]["region"]["layers"] == [0, 7]
    run_json = json.loads((out / "run.json").read_text())
    layers = run_json["parameters"]["layers"]
    assert 0 < layers["trainable"] < 2 / 8 * layers["total"]  # two layers' MLPs, not two whole layers
    assert "optimizer holds exactly the" in stdout


def test_zero3_offload_config(demo_sft_data, tmp_path):
    # The shipped offload variant: optimizer state and parameters on CPU, DeepSpeed's CPU Adam (JIT-built).
    _, report, stdout = train_and_report(tmp_path, "sft", "off_z3", *demo_sft_data, "--ds-config",
                                         "ds_configs/zero3_offload.json",
                                         "--region", "uniform25")
    check(report, r"model\.multi_modal_projector\.|model\.language_model\.layers\.(0|7)\.")
    assert "optimizer DeepSpeedCPUAdam (optimizer offload: cpu)" in stdout
    assert report["summary"]["config"]["ds_config"].endswith("zero3_offload.json")


def test_text_only_rank_does_not_hang_zero3(demo_dir, tmp_path):
    # 8 samples, half text-only; micro-batch 1 on 2 ranks for 4 steps uses each sample once, so 4 micro-batches
    # carry no image. Without the zero-weighted vision pass those ranks would skip the tower's ZeRO-3 gathers.
    samples = []
    for i in range(8):
        if i % 2:
            conv = [{"from": "human", "value": "What color is the shape?"}, {"from": "gpt", "value": "red"}]
            samples.append({"id": f"t{i}", "conversations": conv})
        else:
            conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]
            samples.append({"id": f"i{i}", "image": f"images/{i:05d}.png", "conversations": conv})
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(samples))
    # Evaluation shards in order (rank r takes samples r, r + 2, ...): rank 0 generates from image prompts only,
    # rank 1 from text-only prompts, whose left-padded batches must run the vision tower too (synced_gpus).
    (tmp_path / "images").mkdir()  # copies: a link leaving the data's folder is dropped as image_outside_folder
    for s in samples:
        if "image" in s:
            shutil.copy(demo_dir / s["image"], tmp_path / s["image"])
    _, report, _ = train_and_report(tmp_path, "sft", "mixed_z3", "--zero", "3", "--region", "uniform25",
                                    "--data", str(data), "--image-folder", str(demo_dir), "--max-steps", "4",
                                    "--micro-batch", "1", "--eval-data", str(data), "--eval-max-samples", "4")
    check(report, r"model\.multi_modal_projector\.|model\.language_model\.layers\.(0|7)\.")
    assert report["summary"]["eval"]["samples"] == 4


def test_grad_ckpt_and_accumulation_zero3(demo_sft_data, tmp_path):
    # Non-reentrant activation checkpointing with frozen layers below and between the trained ones.
    _, report, stdout = train_and_report(tmp_path, "sft", "ckpt_z3", *demo_sft_data, "--zero", "3", "--region",
                                         "layers:2,5",
                                         "--grad-ckpt", "--grad-accum", "2", "--max-steps", "2")
    check(report, r"model\.multi_modal_projector\.|model\.language_model\.layers\.(2|5)\.")
    assert report["summary"]["config"]["grad_accum"] == 2 and report["summary"]["config"]["grad_ckpt"]


def test_same_seed_same_losses(demo_sft_data, tmp_path):
    import os
    from pathlib import Path
    shm = lambda: set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))  # noqa: E731
    before = shm()
    losses = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *FAST, *demo_sft_data, "--zero", "2",
                                "--eval-max-samples", "2"))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        losses.append([json.loads(x).get("loss") for x in (out / "metrics.jsonl").read_text().splitlines()])
    assert len(losses[0]) == 4 and losses[0] == losses[1]  # 3 steps + the eval line, bit-identical in fp32
    assert shm() == before  # each rank removed DeepSpeed's 69 MB shared-memory buffer at exit (engine.py)


def test_compare_full_times_both_arms(demo_sft_data, tmp_path):
    out = tmp_path / "u25"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *FAST, *demo_sft_data, "--max-steps", "6",
                            "--zero", "2",
                            "--compare-full", "6"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    mine = json.loads((out / "run.json").read_text())
    full = json.loads((out / "compare-full" / "run.json").read_text())
    c = mine["compare_full"]
    assert full["region"]["layers"] == list(range(8)) and full["steps_done"] == 6
    assert full["config"]["micro_batch"] == 4 and full["config"]["zero"] == 2 and full["config"]["seed"] == 0
    assert not (out / "compare-full" / "model.safetensors").exists() and "eval" not in full
    assert c["step_seconds"] == {"selective": mine["timing"]["step_seconds"], "full": full["timing"]["step_seconds"]}
    assert c["step_time_ratio"] == mine["timing"]["step_seconds"] / full["timing"]["step_seconds"]
    # both arms read the same batches, so the FLOP model's ratio is exactly that of their per-step FLOPs; for
    # uniform25 on 8 layers (2 trained, all 8 on the backward path) it lies between 2/3 and 1
    assert c["ideal_ratio"] == mine["timing"]["hardware_tflops_per_step"] / full["timing"]["hardware_tflops_per_step"]
    assert 0.67 < c["ideal_ratio"] < 1
    spe = mine["steps_per_epoch"]
    assert c["epoch_gpu_hours"]["full"] == full["timing"]["step_seconds"] * spe * 2 / 3600
    assert "compare-full: step" in res.stdout
    # a finished full run's directory instead of N: its measured figures are used, nothing else is trained
    other = tmp_path / "u25b"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(other), *FAST, *demo_sft_data, "--max-steps", "6",
                            "--zero", "2",
                            "--compare-full", str(out / "compare-full")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    c2 = json.loads((other / "run.json").read_text())["compare_full"]
    assert c2["step_seconds"]["full"] == full["timing"]["step_seconds"] and not (other / "compare-full").exists()
    assert c2["source"] == f"the finished full run {out / 'compare-full'}"


def test_zero_to_fp32_of_our_checkpoint_equals_the_export(demo_sft_data, tmp_path):
    # DeepSpeed's own consolidation of the ZeRO-3 checkpoint (frozen weights included) against the
    # transformers export of the same step: the same tensors, bit for bit in fp32.
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "z3"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *FAST, *demo_sft_data, "--max-steps", "2",
                            "--save-every", "2", "--zero", "3", "--eval-max-samples", "1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step-00000002")
    exported = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    assert set(consolidated) == set(exported)
    assert all(torch.equal(consolidated[k], exported[k]) for k in exported)


def test_zero3_builds_and_loads_partitioned_and_imports_a_projector_into_the_partitions(demo_dir, tmp_path):
    # No rank materialises the model: every parameter arrives as a ZeRO-3 partition (local shape [0]); each rank
    # holds about half; gathered, the weights are the checkpoint's, and the projector written into the
    # partitions (GatheredParameters with modifier rank 0) is the imported one on both ranks.
    import torch
    g = torch.Generator().manual_seed(0)
    torch.save({f"model.mm_projector.{i}.{k}": torch.randn(*s, generator=g)
                for i, w in ((0, (128, 64)), (2, (128, 128))) for k, s in (("weight", w), ("bias", w[:1]))},
               tmp_path / "mm_projector.bin")
    res = run(deepspeed_cmd(2, "tests/helpers/partitioned_load.py", str(demo_dir / "base_model"),
                            str(tmp_path / "mm_projector.bin"), str(tmp_path)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = reports[0]["total"]
    assert total > 1_000_000
    for rep in reports:
        assert rep["partitioned"] and rep["checkpoint_equal"] and rep["projector_imported"]
        assert total / 2 <= rep["local"] < total / 2 + 1000  # half, plus per-tensor padding to an even split


@pytest.mark.parametrize("family,flags", [
    # micro-batch 1 over samples where every third one is text-only: some micro-batches carry no image, so the
    # masked dummy (a 4 x 4 patch grid) keeps the ZeRO-3 gathers of the vision tower in step on both ranks;
    # evaluation generates on both ranks with synced_gpus.
    ("qwen2_vl", ["--zero", "3", "--micro-batch", "1", "--max-steps", "4", "--image-aspect-ratio", "square"]),
    # Qwen2.5-VL's windowed vision tower, padded-square images, activation checkpointing, ZeRO-2.
    ("qwen2_5_vl", ["--zero", "2", "--micro-batch", "2", "--grad-ckpt", "--image-aspect-ratio", "pad"]),
])
def test_qwen_checkpoints_train_the_region_and_export(tmp_path, family, flags):
    """A tiny Qwen2-VL / Qwen2.5-VL checkpoint in the real format: only the merger (the projector) and decoder
    layers 1 and 3 change, the export reloads to the engine's weights, and it carries the tokenizer, chat
    template and image processor the run used."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from helpers import qwen
    ckpt = qwen.build(str(tmp_path / "ckpt"), family)
    data = qwen.write_data(str(tmp_path / "data"), n=12, text_every=3)
    out, report, stdout = train_and_report(tmp_path, "sft", family, "--model", ckpt, "--data", data, "--template",
                                           "auto", "--region", "layers:1,3", "--eval-data", data, "--lr", "1e-3",
                                           *flags)
    check(report, r"model\.visual\.merger\.|model\.language_model\.layers\.(1|3)\.")
    summary = report["summary"]
    assert summary["eval"]["samples"] == 6 and summary["region"]["layers"] == [1, 3]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]
    assert all(x["loss"] > 0 and 0 < x["mfu"] < 1 and x["tflops_per_step"] > 0 for x in lines)
    assert AutoTokenizer.from_pretrained(out).chat_template == qwen.QWEN_TEMPLATE
    assert AutoImageProcessor.from_pretrained(out).to_dict() == AutoImageProcessor.from_pretrained(ckpt).to_dict()
    prepared = json.loads((out / "prepared" / "train" / "prepare.json").read_text())["identity"]
    assert prepared["pad_to_square"] == ("pad" in flags)


def gemma3_export(out, ckpt, stdout, report):
    """The projector (matmul weight and its norm's scale) trains, the tied embeddings stay; Gemma3Processor loads."""
    from transformers import AutoProcessor

    from helpers import gemma3
    assert re.search(r"embed=lm_head \(tied\) trainable +0 /", stdout)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Gemma3Processor" and processor.chat_template == gemma3.GEMMA3_TEMPLATE
    assert processor.full_image_sequence == AutoProcessor.from_pretrained(ckpt).full_image_sequence


def qwen3_vl_export(out, ckpt, stdout, report):
    """The merger and both DeepStack mergers change; the tied embeddings stay; tokenizer and image processor kept."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from helpers import qwen
    changed = {n.split(".")[2] for n, p in report["params"].items() if p["changed"]}
    assert changed == {"merger", "deepstack_merger_list", "layers"}
    assert re.search(r"embed=lm_head \(tied\) trainable +0 /", stdout)
    assert AutoTokenizer.from_pretrained(out).chat_template == qwen.QWEN3_TEMPLATE
    assert AutoImageProcessor.from_pretrained(out).to_dict() == AutoImageProcessor.from_pretrained(ckpt).to_dict()


def qwen3_5_export(out, ckpt, stdout, report):
    """The merger changes and layer 1, a Gated DeltaNet layer, changes whole (its convolution and decay too); the
    exported config keeps the layer types; tokenizer (Qwen3_5Tokenizer) and image processor kept."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from helpers import qwen
    changed = {n for n, p in report["params"].items() if p["changed"]}
    assert {f"model.language_model.layers.1.linear_attn.{n}" for n in ("conv1d.weight", "A_log", "dt_bias")} <= changed
    assert AutoConfig.from_pretrained(out).text_config.layer_types == qwen.TEXT3_5["layer_types"]
    assert re.search(r"embed=lm_head \(tied\) trainable +0 /", stdout)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(tok).__name__ == "Qwen3_5Tokenizer" and tok.chat_template == qwen.QWEN3_TEMPLATE
    assert AutoImageProcessor.from_pretrained(out).to_dict() == AutoImageProcessor.from_pretrained(ckpt).to_dict()


def moe_export(base_check):
    def check_export(out, ckpt, stdout, report):
        """Layer 1 changes whole: its router and all its experts (3-D weights) too; the router's load-balancing
        loss is logged at every step (the tiny configs set output_router_logits)."""
        changed = {n for n, p in report["params"].items() if p["changed"]}
        assert {f"model.language_model.layers.1.mlp.{n}" for n in ("gate.weight", "experts.gate_up_proj",
                                                                    "experts.down_proj")} <= changed
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "step" in r and "loss" in r and "lr" in r]
        assert len(steps) == 4 and all(r["router_loss"] > 0 for r in steps)
        base_check(out, ckpt, stdout, report)
    return check_export


def qwen3_vl_moe_export(out, ckpt, stdout, report):
    """The run started from the released experts' layout (experts x hidden x 2 inter, which ZeRO-3 loading needs:
    families/qwen3_vl_moe.py) and its export is what save_pretrained writes (transformers' own layout), which plain
    transformers loads (the reload above)."""
    from safetensors import safe_open
    for path, want in ((Path(ckpt), [[4, 32, 16], [4, 8, 32]]), (out, [[4, 16, 32], [4, 32, 8]])):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            shapes = {k.rsplit(".", 1)[1]: f.get_slice(k).get_shape() for k in f.keys() if "layers.1.mlp.experts" in k}
        assert [shapes["gate_up_proj"], shapes["down_proj"]] == want, path
    qwen3_vl_export(out, ckpt, stdout, report)


def internvl_export(out, ckpt, stdout, report):
    """The exported image processor tiles as InternVLProcessor calls it; the prepared data counted tiles."""
    from transformers import AutoImageProcessor
    exported = AutoImageProcessor.from_pretrained(out)
    assert exported.crop_to_patches and exported.max_patches == 4
    prepared = json.loads((out / "prepared" / "train" / "prepare.json").read_text())["identity"]
    assert prepared["n_image_tokens"] == "tiles" and prepared["tokens_per_tile"] == 4


def processor_export(name: str, template_of):
    def check_export(out, ckpt, stdout, report):
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(out)
        assert type(processor).__name__ == name and processor.chat_template == template_of()
    return check_export


def split_processor_export(out, ckpt, stdout, report):
    """Tokenizer, image processor and processor_config.json as the checkpoint had them (SmolVLMProcessor and
    LlavaOnevisionProcessor load from them where torchvision is installed)."""
    from transformers import AutoImageProcessor
    assert (out / "processor_config.json").read_text() == (Path(ckpt) / "processor_config.json").read_text()
    assert AutoImageProcessor.from_pretrained(out).to_dict() == AutoImageProcessor.from_pretrained(ckpt).to_dict()


def family_run(family: str):
    """(checkpoint builder, the tensors that must change, the export's family-specific checks)."""
    from helpers import gemma3, idefics3, internvl, llava_next, llava_onevision, qwen
    runs = {
        "gemma3": (gemma3.build, r"model\.multi_modal_projector\.", gemma3_export),
        "qwen3_vl": (lambda d: qwen.build(d, "qwen3_vl"), r"model\.visual\.(merger|deepstack_merger_list\.[01])\.",
                     qwen3_vl_export),
        "qwen3_5": (lambda d: qwen.build(d, "qwen3_5"), r"model\.visual\.merger\.", qwen3_5_export),
        "qwen3_vl_moe": (lambda d: qwen.build(d, "qwen3_vl_moe"),
                         r"model\.visual\.(merger|deepstack_merger_list\.[01])\.", moe_export(qwen3_vl_moe_export)),
        "qwen3_5_moe": (lambda d: qwen.build(d, "qwen3_5_moe"), r"model\.visual\.merger\.",
                        moe_export(qwen3_5_export)),
        "internvl": (internvl.build, r"model\.multi_modal_projector\.", internvl_export),
        "llava_next": (llava_next.build, r"model\.multi_modal_projector\.|model\.image_newline$",
                       processor_export("LlavaNextProcessor", lambda: llava_next.TEMPLATE)),
        "llava_onevision": (llava_onevision.build, r"model\.multi_modal_projector\.|model\.image_newline$",
                            split_processor_export),
        "idefics3": (idefics3.build, r"model\.connector\.",
                     processor_export("Idefics3Processor", lambda: idefics3.TEMPLATE)),
        "smolvlm": (idefics3.build_smolvlm, r"model\.connector\.", split_processor_export),
    }
    return runs[family]


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe", "internvl",
                                    "llava_next", "llava_onevision", "idefics3", "smolvlm"])
def test_a_family_trains_exactly_its_region_and_projector_and_exports(tmp_path, family):
    """A tiny checkpoint of each family written by transformers' own classes, 2 ranks, ZeRO-3, uniform25 (layer 1 of
    4), micro-batch 1 over images of several sizes and text-only samples (the masked dummy image keeps the tower's
    gathers in step), with evaluation (generation under ZeRO-3): only the projector (Gemma 3's matmul and norm scale;
    Qwen3-VL's merger and DeepStack mergers; Qwen3.5's merger, its layer 1 a Gated DeltaNet layer; the MoE variants'
    layer 1 with its router and experts; InternVL's and
    Idefics3's pixel-shuffle projectors; LLaVA-NeXT's and LLaVA-OneVision's projector and image_newline) and layer
    1 change, and the export reloads to the engine's
    weights with the names save_pretrained writes, with the family's processor. LLaVA-OneVision's data has samples of
    two images (not tiled)."""
    from helpers import family_data, llava_onevision, qwen
    build, projector, check_export = family_run(family)
    ckpt = build(str(tmp_path / "ckpt"))
    if family == "llava_onevision":
        data = family_data.write(str(tmp_path / "data"), llava_onevision.SIZES, n=12)[0]
    else:
        data = qwen.write_data(str(tmp_path / "data"), n=12, text_every=3)
    out, report, stdout = train_and_report(tmp_path, "sft", family, "--model", ckpt, "--data", data, "--template",
                                           "auto", "--region", "uniform25", "--eval-data", data, "--lr", "1e-3",
                                           "--zero", "3", "--micro-batch", "1", "--max-steps", "4")
    check(report, projector + r"|model\.(language_model|text_model)\.layers\.1\.")
    summary = report["summary"]
    assert summary["eval"]["samples"] == 6 and summary["region"]["layers"] == [1]
    check_export(out, ckpt, stdout, report)


def test_bf16_zero3_on_cpu_gathers_16bit_weights(demo_sft_data, tmp_path):
    """The paper's precision, bf16, under ZeRO-3 (DeepSpeed's CPU accelerator supports it; fp16 it does not):
    frozen weights stay bit-identical to the base model cast to bf16, the region's change, and the export is
    the gathered bf16 weights (REFERENCE trap 5: frozen weights must survive 16-bit saves)."""
    from safetensors import safe_open
    out, report, stdout = train_and_report(tmp_path, "sft", "bf16_z3", *demo_sft_data, "--zero", "3", "--precision",
                                           "bf16",
                                           "--region", "uniform25", "--lr", "2e-2", "--save-every", "3")
    check(report, r"model\.multi_modal_projector\.|model\.language_model\.layers\.(0|7)\.")
    check_size_estimate(out, report)
    assert {p["dtype"] for p in report["params"].values()} == {"torch.bfloat16"}
    summary = report["summary"]
    assert summary["precision"] == "bf16"
    assert json.loads((out / "run.json").read_text())["ds_config"]["bf16"] == {"enabled": True}
    assert summary["timing"]["peak_source"] == "measured bf16 matmul on this CPU"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}


def test_qwen3_vl_stage1_projector_starts_stage2(tmp_path):
    """Both stages on a Qwen3-VL checkpoint: stage 1 (plain template, ZeRO-2) trains only the projector, the merger
    and the DeepStack mergers, and writes both to projector.safetensors; stage 2 (ZeRO-3, --init) starts from them:
    its frozen weights equal the base, the projector and layer 2 move on. (Qwen2-VL's one-module merger takes the
    path Llava's projector takes.)"""
    from safetensors.torch import load_file

    from helpers import qwen
    ckpt = qwen.build(str(tmp_path / "ckpt"), "qwen3_vl")
    data = qwen.write_data(str(tmp_path / "data"), n=8)
    common = ["--model", ckpt, "--data", data, "--lr", "1e-3"]
    out1, report1, _ = train_and_report(tmp_path, "pretrain", "qwen_pre", *common, "--zero", "2")
    projector = r"model\.visual\.(merger|deepstack_merger_list\.[01])\."
    check(report1, projector)
    assert report1["summary"]["config"]["template"] == "plain"
    merger = load_file(out1 / "projector.safetensors")
    assert set(merger) == {f"{m}.{layer}.{kind}" for m in ("merger", "deepstack.0", "deepstack.1")
                           for layer in ("norm", "linear_fc1", "linear_fc2") for kind in ("weight", "bias")}
    _, report2, _ = train_and_report(tmp_path, "sft", "qwen_sft", *common, "--zero", "3", "--init", str(out1),
                                     "--region", "layers:2")
    check(report2, projector + r"|model\.language_model\.layers\.2\.")  # "changed" is against --init


def test_fp16_loss_scaling_with_frozen_layers_zero3(demo_sft_data, tmp_path):
    """fp16 under ZeRO-3 through DeepSpeed's dynamic loss scaler (CPU ranks; see helpers/fp16_on_cpu.py for why
    that needs DeepSpeed's fp16 capability answer overridden here). A first loss scale of 2^20 overflows: those
    steps are skipped (the weights and the LR schedule stay), the scale halves each time, then steps apply. The
    frozen weights stay bit-identical in fp16, the region changes, the export reloads to the engine's weights."""
    ds = json.loads((Path("ds_configs") / "zero3.json").read_text())
    ds["fp16"] = {"initial_scale_power": 20, "hysteresis": 1}  # kept by build_ds_config; --precision turns it on
    (tmp_path / "fp16.json").write_text(json.dumps(ds))
    out, report = tmp_path / "fp16", tmp_path / "fp16_report.json"
    res = run(deepspeed_cmd(2, "tests/helpers/fp16_on_cpu.py", "sft", str(report), "--", "--output-dir", str(out),
                            *FAST, *demo_sft_data, "--max-steps", "8", "--ds-config", str(tmp_path / "fp16.json"),
    "--precision",
                            "fp16", "--region", "uniform25", "--lr", "1e-3"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(report.read_text())
    check(report, r"model\.multi_modal_projector\.|model\.language_model\.layers\.(0|7)\.")
    assert {p["dtype"] for p in report["params"].values()} == {"torch.float16"}
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]
    skipped = [s["skipped_steps"] for s in steps]
    assert 1 <= skipped[-1] < 8 and report["summary"]["skipped_steps"] == skipped[-1]
    lr_before = 1e-3
    for s, prev in zip(steps, [0] + skipped):
        assert s["loss_scale"] == 2.0 ** (20 - s["skipped_steps"])  # halved on every overflow, never raised here
        if s["skipped_steps"] > prev:  # an overflow: no update, the schedule does not move
            assert s["grad_norm"] == float("inf") and s["lr"] == lr_before
        else:
            assert s["grad_norm"] < float("inf") and s["lr"] < lr_before
        lr_before = s["lr"]


@pytest.fixture(scope="module")
def tied_model(demo_dir, tmp_path_factory):
    """The demo model with its input embeddings and LM head tied (one tensor), as Qwen2-VL-2B, Qwen2.5-VL-3B and
    anything assembled from a tied LLM have them."""
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    out = tmp_path_factory.mktemp("tied") / "model"
    cfg = AutoConfig.from_pretrained(demo_dir / "base_model")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(demo_dir / "base_model").save_pretrained(out)
    return out


@pytest.mark.parametrize("zero,part", [("2", "+embed"), ("3", "+lm_head")])
def test_tied_embeddings_train_as_one_tensor(tied_model, tmp_path, zero, part):
    from transformers import AutoModelForImageTextToText
    out, report, stdout = train_and_report(tmp_path, "sft", f"tied_z{zero}", "--model", str(tied_model), "--data",
                                           "data/demo/sft_train.json", "--zero", zero, "--lr", "1e-3",
                                           "--region", f"uniform25 {part}")  # a space, read as written
    # +embed or +lm_head: the one tensor trains (before: +embed left it frozen, +lm_head trained the embeddings
    # while the log credited lm_head alone).
    check(report, r"model\.multi_modal_projector\.|model\.language_model\.layers\.(0|7)\."
                  r"|model\.language_model\.embed_tokens\.weight$")
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    counts = report["summary"]["parameters"]
    assert counts["embed=lm_head (tied)"] == {"trainable": reloaded.get_input_embeddings().weight.numel(),
                                              "total": reloaded.get_input_embeddings().weight.numel()}
    assert "embed" not in counts and "lm_head" not in counts
    assert stdout.count("embed=lm_head (tied)") == 1  # logged once, as tied


def test_tied_embeddings_switched_apart_are_refused_before_loading(tied_model, tmp_path):
    import sys
    res = run([sys.executable, "launch/sft.py", "--model", str(tied_model), "--data", "data/demo/sft_train.json",
               "--output-dir", str(tmp_path / "o"), "--region", "uniform25+embed-lm_head"], timeout=300)
    assert res.returncode == 2
    assert "this model ties its input embeddings and LM head (one tensor)" in res.stderr
    assert "Loading weights" not in res.stdout + res.stderr


def test_a_non_finite_loss_stops_the_run_before_anything_of_it_is_saved(demo_sft_data, tmp_path):
    # A learning rate of 1e30 makes step 1's update blow the weights up: step 2's loss is not finite.
    out = tmp_path / "nan"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *FAST, *demo_sft_data, "--zero", "3",
                            "--lr", "1e30",
                            "--save-every", "1", "--keep-checkpoints", "1"))
    assert res.returncode != 0
    assert "error: step 2: loss " in res.stderr
    assert ("is not finite; the run stopped before saving anything of this step; the last good checkpoint is "
            f"{out}/checkpoints/step-00000001" in res.stderr)
    assert sorted(p.name for p in (out / "checkpoints").glob("[!.]*")) == ["latest", "step-00000001"]
    assert not (out / "model.safetensors").exists()  # no export of non-finite weights
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "diverged" and run_json["steps_done"] == 1 and "step 2" in run_json["error"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_fp16_loss_scale_at_its_minimum_stops_the_run(demo_sft_data, tmp_path):
    # As above, but the scale may not fall below 2^19: the first overflow (at 2^20) leaves it at its minimum.
    ds = json.loads((Path("ds_configs") / "zero3.json").read_text())
    ds["fp16"] = {"initial_scale_power": 20, "hysteresis": 1, "min_loss_scale": 2 ** 19}
    (tmp_path / "fp16.json").write_text(json.dumps(ds))
    out = tmp_path / "fp16min"
    res = run(deepspeed_cmd(2, "tests/helpers/fp16_on_cpu.py", "sft", str(tmp_path / "r.json"), "--", "--output-dir",
                            str(out), *FAST, *demo_sft_data, "--ds-config", str(tmp_path / "fp16.json"),
    "--precision", "fp16",
                            "--region", "uniform25", "--lr", "1e-3", "--save-every", "1"))
    assert res.returncode != 0
    assert ("step 1: fp16 gradients overflowed and the loss scale has fallen to its minimum 524288" in
            res.stdout + res.stderr)
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))
    assert json.loads((out / "run.json").read_text())["status"] == "diverged"
