"""The real launchers, as README shows them: bad input fails early with a clear message; a short run works."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from conftest import deepspeed_cmd, run


@pytest.mark.parametrize("flags,message", [
    (["--region", "uniform200"], "invalid region spec 'uniform200': percentage 200 is outside (0, 100]"),
    (["--region", "layers:1,8"], "layer index 8 is out of range 0..7"),
    (["--region", "paper32"], "paper32 is defined for 32-layer LLMs only, this one has 8"),
    (["--zero", "1"], "--zero must be a whole number in [2, 3], got 1"),
    (["--region", "uniform 25"], "invalid region spec 'uniform 25': it contains spaces inside a name or number"),
    (["--ds-config", "{ds:{\"zero_optimization\": {\"stage\": 2,}}}"], "is not valid JSON (Expecting property name"),
    (["--ds-config", "{ds:[1, 2]}"], "holds a JSON list, not an object of settings"),
    (["--ds-config", "{ds:{\"zero_optimization\": {\"stage\": 2, \"overlap_comms\": false}}}"],
     "DeepSpeed rejects the config"),
    (["--init", "no/such/dir"], "--init no/such/dir is not a directory"),
    (["--model", "no/such/model", "--data", "x.json"], "--model no/such/model: no config.json"),
    (["--init-projector", "no/mm_projector.bin"], "--init-projector no/mm_projector.bin: no such file"),
    (["--init-projector", "{7b}"], "its linears (mm_projector.[0, 2]) have shapes"),
    (["--template", "chatml"], "--template chatml writes the special tokens ['<|im_start|>', '<|im_end|>'], which the "
                               "tokenizer of --model data/demo/base_model does not have"),
    (["--template", "alpaca"], "--template must be one of auto, plain, vicuna_v1, llama3, phi3, chatml"),
    (["--data", "no/such.jsonl"], "--data no/such.jsonl does not exist"),
    (["--data", "{csv}"], "unknown file type '.csv'; give .json (a LLaVA list), .jsonl, .parquet"),
    (["--image-aspect-ratio", "crop"], "--image-aspect-ratio must be one of pad, square"),
])
def test_bad_input_fails_before_weights_load(demo_dir, tmp_path, flags, message):
    ds_file = tmp_path / "ds.json"
    if flags[0] == "--ds-config":  # the file's content is given in the case; the message must name the file
        ds_file.write_text(flags[1][len("{ds:"):-1])
        flags = ["--ds-config", str(ds_file)]
    if "{csv}" in flags:
        flags = [str(tmp_path / "d.csv") if f == "{csv}" else f for f in flags]
        (tmp_path / "d.csv").write_text("id,conversations\n")
    if "{7b}" in flags:  # LLaVA-1.5-7B's projector shapes (CLIP-L 1024 -> 4096) for the 128-wide demo LLM
        flags = [str(tmp_path / "mm_projector.bin") if f == "{7b}" else f for f in flags]
        torch.save({"model.mm_projector.0.weight": torch.zeros(4096, 1024),
                    "model.mm_projector.0.bias": torch.zeros(4096),
                    "model.mm_projector.2.weight": torch.zeros(4096, 4096),
                    "model.mm_projector.2.bias": torch.zeros(4096)}, flags[-1])
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "out"), *flags], timeout=300)
    assert res.returncode == 2
    assert message in res.stderr
    assert flags[0] != "--ds-config" or str(ds_file) in res.stderr
    assert "Loading weights" not in res.stdout + res.stderr  # nothing heavy happened
    if "region" in message:
        assert "valid region specs:" in res.stderr


def test_a_stale_jit_build_lock_stops_the_launch_instead_of_hanging(demo_dir, tmp_path):
    """A DeepSpeed op build killed mid-way leaves torch's lock file; without the check every later launch waited
    on it forever, silently (seen on this project's machine)."""
    import os
    import time
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 1200, time.time() - 1200))
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "out"), "--max-steps", "1"],
              env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}, timeout=120)
    assert res.returncode == 2
    assert f"torch's JIT-build lock {lock} is 20 min old: a build of a DeepSpeed op was killed mid-way" in res.stderr
    assert "remove that file (when no build is running) and rerun" in res.stderr
    assert not (tmp_path / "out").exists()


def test_sft_launcher_end_to_end(demo_dir, tmp_path):
    out = tmp_path / "sft"
    res = run(deepspeed_cmd(1, "launch/sft.py", "--region", "uniform25", "--output-dir", str(out), "--max-steps",
                            "2", "--micro-batch", "4", "--log-every", "1", "--eval-max-samples", "4",
                            "--num-workers", "0", runner=True))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "no --init given: stage 2 starts from the embedded demo model's random projector" in res.stdout
    assert "region uniform25 -> layers [0, 7] of 8" in res.stdout
    assert "step 2/2 | loss" in res.stdout and "held-out answer accuracy" in res.stdout
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "complete" and run_json["region"]["layers"] == [0, 7]
    assert run_json["config"]["region"] == "uniform25" and run_json["world_size"] == 1
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.num_hidden_layers == 8


def test_llava_mm_projector_starts_stage_2(demo_dir, tmp_path):
    # The projector frozen (layers:1-projector): the exported projector is exactly the imported mm_projector.bin.
    g = torch.Generator().manual_seed(1)
    src = {f"model.mm_projector.{i}.{k}": torch.randn(*shape, generator=g).to(torch.bfloat16)
           for i, w in ((0, (128, 64)), (2, (128, 128))) for k, shape in (("weight", w), ("bias", w[:1]))}
    torch.save(src, tmp_path / "mm_projector.bin")
    out = tmp_path / "sft"
    res = run(deepspeed_cmd(1, "launch/sft.py", "--region", "layers:1-projector", "--init-projector",
                            str(tmp_path / "mm_projector.bin"), "--output-dir", str(out), "--max-steps", "1",
                            "--micro-batch", "4", "--eval-max-samples", "2", "--num-workers", "0"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"imported 4 projector tensors from {tmp_path / 'mm_projector.bin'}" in res.stdout
    saved = load_file(out / "projector.safetensors")
    assert torch.equal(saved["linear_1.weight"], src["model.mm_projector.0.weight"].float())
    assert torch.equal(saved["linear_2.bias"], src["model.mm_projector.2.bias"].float())


def raw_jsonl_with_problems(tmp_path, demo_dir):
    """16 good demo samples as JSONL in the messages style, one of them with an image truncated after its header
    (passes --verify-images header, fails to decode in training), plus a malformed line and a missing image."""
    samples = json.loads((demo_dir / "sft_train.json").read_text())[:16]
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i, s in enumerate(samples):
        src = (demo_dir / s["image"]).read_bytes()
        name = f"{i}.png"
        (images / name).write_bytes(src[: len(src) // 2] if i == 3 else src)
        lines.append(json.dumps({"id": s["id"], "images": [name], "messages": [
            {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
            for t in s["conversations"]]}))
    lines.insert(5, '{"id": "broken", "messages": [')
    lines.insert(9, json.dumps({"id": "gone", "image": "nope.png", "conversations": samples[0]["conversations"]}))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, images


def test_raw_data_is_prepared_once_by_rank_0_and_bad_images_are_counted(demo_dir, tmp_path):
    data, images = raw_jsonl_with_problems(tmp_path, demo_dir)
    out = tmp_path / "sft"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--data", str(data), "--image-folder", str(images), "--output-dir",
                            str(out), "--verify-images", "header", "--max-bad-fraction", "0.2", "--micro-batch", "4",
                            "--epochs", "1", "--num-workers", "1", "--log-every", "1", "--packing"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "prepared" / "train" / "report.json").read_text())
    assert (report["samples"], report["kept"]) == (18, 16)
    assert {d["line"]: d["reason"] for d in report["dropped_samples"]} == {6: "malformed_json", 10: "missing_image"}
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps_done"] == 2 and summary["dataset_size"] == 16 and "dataset_size" not in summary["config"]
    assert summary["images_replaced"] == 1  # the truncated file, read once in the epoch
    assert "image failed to decode" in res.stdout + res.stderr and "3.png" in res.stdout + res.stderr
    assert res.stdout.count("prepared " + str(data)) == 1  # rank 0 only


def test_too_many_bad_samples_stop_before_any_weights_load(demo_dir, tmp_path):
    data, images = raw_jsonl_with_problems(tmp_path, demo_dir)
    res = run([sys.executable, "launch/sft.py", "--data", str(data), "--image-folder", str(images), "--output-dir",
               str(tmp_path / "sft")])
    assert res.returncode == 2
    assert ("3 of 18 samples (16.7%) are bad, more than --max-bad-fraction 5.0%: malformed_json 1, missing_image 1, "
            "unreadable_image 1; every dropped sample is listed in") in res.stderr
    assert "Loading weights" not in res.stdout + res.stderr
