"""The planner (launch/plan.py): model states against DeepSpeed's own estimators on LLaVA-1.5-7B / 13B configs,
activations against what autograd really keeps in each family's real tiny model (bf16, CPU, several regions, with
and without checkpointing; within 5%), the tiled families' tiles and tokens against their processors, and the plan
itself: candidates, the best fitting one, full tuning, the ratio, refusals."""
import importlib
import json
import sys
import weakref

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import AutoModelForImageTextToText

from conftest import ROOT, run
from helpers import qwen
from lvlm_region.model import families, lora, regions
from lvlm_region.train import plan
from lvlm_region.infra import timing
from lvlm_region.model.families.llava import image_seq_length
from lvlm_region.model.loss import loss_positions, token_loss_sum
from lvlm_region.model.load import enable_checkpointing
from lvlm_region.model.trainable import apply_region

CONFIGS = ROOT / "docs" / "configs"
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe")


def launcher():
    """`lvlm-region plan`'s main (launch/plan.py calls it), in this process (the planner starts no process group and
    loads no weights); a flag argparse refuses returns its exit status 2 as the command line does."""
    from lvlm_region.commands import plan as command

    def main(argv):
        try:
            return command.main(argv)
        except SystemExit as e:
            return e.code
    return main


@pytest.mark.parametrize("name,params", [("llava-1.5-7b", 7.06e9), ("llava-1.5-13b", 13.35e9)])
def test_full_tuning_model_states_equal_deepspeeds_estimators(name, params):
    shapes = plan.Shapes(plan.Setting(model=str(CONFIGS / name)))
    n, largest = shapes.total, shapes.largest
    assert n == pytest.approx(params, rel=0.01)  # LLaVA-1.5's published sizes (vision tower included)
    assert largest == 32064 * shapes.config.text_config.hidden_size  # the LM head (or the embeddings)
    for gpus in (1, 8, 16):
        states = {(z, off): timing.model_states(n, n, z, gpus, "bf16", off, largest=largest)["total_on_device"]
                  for z in (2, 3) for off in (False, True)}
        # DeepSpeed's estimators assume every parameter trains; rounding: they truncate to whole bytes
        assert states[(2, False)] == pytest.approx(estimate_zero2_model_states_mem_needs(n, gpus, 1, False)[1], abs=1)
        assert states[(2, True)] == pytest.approx(estimate_zero2_model_states_mem_needs(n, gpus, 1, True)[1], abs=1)
        assert states[(3, False)] == pytest.approx(
            estimate_zero3_model_states_mem_needs(n, largest, gpus, 1, cpu_offload=False)[1], abs=1)
        assert states[(3, True)] == pytest.approx(
            estimate_zero3_model_states_mem_needs(n, largest, gpus, 1, cpu_offload=True, cpu_offload_params=False)[1],
            abs=1)
    # a region: frozen parameters keep only their 16-bit weights (what the estimators cannot express)
    t = shapes.trainable("uniform25")
    layers = regions.resolve("uniform25", shapes.depth).layers
    projector = sum(p.numel() for p in shapes.parts.projector.parameters())
    assert t == sum(p.numel() for i in layers for p in shapes.parts.layers[i].parameters()) + projector
    assert timing.model_states(n, t, 2, 8, "bf16", False)["total_on_device"] == 2 * n + 18 * t / 8


def measured_saved_bytes(model, inputs: dict, labels: torch.Tensor) -> int:
    """What autograd really keeps for the trainer's forward and loss: the distinct storages of the saved tensors
    still alive when the loss is computed, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(weakref.ref(t)) or t, lambda t: t):
        loss = token_loss_sum(model(**inputs, logits_to_keep=loss_positions(labels)).logits, labels)
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in saved)
             if t is not None}
    del loss
    return sum(n for ptr, n in alive.items() if ptr not in params)


def compare(path, inputs, labels, seq, specs, lora_r=None, **setting):
    """{(spec, checkpointing): estimated / measured}; each measurement on a freshly loaded model, as a run starts
    (what autograd keeps depends on what earlier enable / disable calls left behind)."""
    if lora_r:
        setting.update(tuner="lora", lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05)
    shapes = plan.Shapes(plan.Setting(model=str(path), seq_len=seq, trained_fraction=(seq - 1) / seq, **setting))
    rows = labels.shape[0]
    out = {}
    for spec in specs:
        for ckpt in (False, True):
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
            region = regions.resolve(spec, shapes.depth)
            if lora_r:
                lora.inject(model, lora.peft_config(model, region, lora_r, 2 * lora_r, 0.05))
            counts = apply_region(model, region, "lora" if lora_r else "full")
            assert counts["all"]["trainable"] == shapes.trainable(spec)
            if ckpt:
                enable_checkpointing(model)
            model.train()
            real = measured_saved_bytes(model, inputs, labels)
            kept, recompute = shapes.activations(spec, ckpt, rows)
            out[(spec, ckpt)] = kept / real
            assert (recompute > 0) == ckpt
    return out


@pytest.mark.parametrize("lora_r", [None, 8])
def test_llava_activations_match_what_autograd_keeps(demo_dir, lora_r):
    base = demo_dir / "base_model"
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="sdpa")
    cfg = model.config
    rows, seq, n = 2, 64, image_seq_length(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((rows, n), cfg.image_token_id), torch.randint(10, 200, (rows, seq - n), generator=g)],
                    1)
    size = cfg.vision_config.image_size
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(rows, 3, size, size, generator=g).bfloat16()}
    specs = ("uniform25", "last25-projector", "uniform25.attn") if lora_r else (
        "uniform25", "full", "none", "middle25-projector", "last25-projector", "uniform25+vision", "uniform25.mlp",
        "last25.attn-projector")
    ratios = compare(base, inputs, ids.clone(), seq, specs, lora_r=lora_r)
    assert all(0.95 <= r <= 1.05 for r in ratios.values()), sorted(ratios.items())


@pytest.mark.parametrize("family", QWEN)
def test_qwen_activations_match_what_autograd_keeps(tmp_path, family):
    """Qwen2-VL, Qwen2.5-VL (windowed vision attention), Qwen3-VL (its DeepStack mergers are projector too, their
    outputs added after layers 0 and 1), Qwen3.5 (Gated DeltaNet layers, on transformers' torch path: the one that
    runs here), and their MoE models: every expert's parameters in the model states, the routed experts run through
    the experts implementation training uses (grouped_mm: tokens x top-k rows whatever the router picks), and the
    load-balancing loss's router logits."""
    from PIL import Image

    path = qwen.build(str(tmp_path / "q"), family)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    cfg = model.config
    side = 8 * qwen.PATCH[family]  # 8 x 8 patches, merged 2 x 2
    px = qwen.image_processor(family)(images=[Image.new("RGB", (side, side), "red")] * 2, return_tensors="pt")
    per_image = int(px["image_grid_thw"][0].prod()) // 4
    rows, seq = 2, 48
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, 30, (rows, seq - per_image - 2), generator=g)
    ids = torch.cat([torch.full((rows, 1), cfg.vision_start_token_id),
                     torch.full((rows, per_image), cfg.image_token_id),
                     torch.full((rows, 1), cfg.vision_end_token_id), text], 1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": px["pixel_values"].bfloat16(), "image_grid_thw": px["image_grid_thw"],
              "mm_token_type_ids": (ids == cfg.image_token_id).long()}
    if family.endswith("_moe"):
        shapes = plan.Shapes(plan.Setting(model=path))
        text = shapes.model.config.get_text_config()
        assert text._experts_implementation == model.config.get_text_config()._experts_implementation == "grouped_mm"
        assert shapes.total == sum(p.numel() for p in model.parameters())
        assert text.output_router_logits and shapes.family.planned_outside_layers(
            shapes.config, shapes.parts.layers, [True] * 4, 10, torch.bfloat16) == (
                (3 if family == "qwen3_vl_moe" else 4) * 10 * 4 * 2)  # Qwen3-VL MoE's layer 2 is dense
    ratios = compare(path, inputs, ids.clone(), seq, ("uniform25", "full", "last25-projector", "uniform25+vision"),
                     image_size=side)
    assert all(0.95 <= r <= 1.05 for r in ratios.values()), sorted(ratios.items())


def test_gemma3_activations_match_what_autograd_keeps(tmp_path):
    """Gemma 3: soft tokens pooled from the tower's patches, each layer's rotary embedding by its type, and the
    materialised mask of its bidirectional image attention (which sdpa keeps per layer): within 5%."""
    from helpers import gemma3

    path = gemma3.build(str(tmp_path / "g"))
    cfg = AutoModelForImageTextToText.from_pretrained(path).config
    rows, seq, n = 2, 48, cfg.mm_tokens_per_image
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((rows, 1), cfg.boi_token_index), torch.full((rows, n), cfg.image_token_index),
                     torch.full((rows, 1), cfg.eoi_token_index),
                     torch.randint(10, 90, (rows, seq - n - 2), generator=g)], 1)
    size = cfg.vision_config.image_size
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "token_type_ids": (ids == cfg.image_token_index).long(),
              "pixel_values": torch.randn(rows, 3, size, size, generator=g).bfloat16()}
    ratios = compare(path, inputs, ids.clone(), seq, ("uniform25", "full", "none", "last25-projector",
                                                      "uniform25+vision"))
    assert all(0.95 <= r <= 1.05 for r in ratios.values()), sorted(ratios.items())


def test_llava_next_tokens_tiles_and_activations_match_the_processor_and_autograd(tmp_path):
    """LLaVA-NeXT: an image of --image-size's side is the base tile plus its grid pinpoint's tiles (the processor's
    pixel tensors), and as many image tokens as LlavaNextProcessor counts; the activations within 5% of autograd."""
    from PIL import Image
    from transformers import AutoProcessor

    from helpers import llava_next

    path = llava_next.build(str(tmp_path / "n"))
    processor = AutoProcessor.from_pretrained(path)
    for side in (28, 40, 56, 70):
        shapes = plan.Shapes(plan.Setting(model=path, image_size=side))
        px = processor.image_processor(images=[Image.new("RGB", (side, side), "red")], return_tensors="pt")
        assert shapes.tokens()[0] == processor._get_num_multimodal_tokens(image_sizes=[(side, side)])[
            "num_image_tokens"][0]
        assert shapes.family.planned_tiles(shapes.config, shapes.image) == px["pixel_values"].shape[1]
    cfg, side, rows, seq = shapes.config, 56, 2, 64
    px = processor.image_processor(images=[Image.new("RGB", (side, side), "red")] * rows, return_tensors="pt")
    n = shapes.tokens()[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((rows, n), cfg.image_token_id), torch.randint(5, 30, (rows, seq - n), generator=g)],
                    1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px["pixel_values"].bfloat16(),
              "image_sizes": px["image_sizes"]}
    ratios = compare(path, inputs, ids.clone(), seq, ("uniform25", "full", "none", "last25-projector",
                                                      "uniform25+vision"), image_size=side)
    assert all(0.95 <= r <= 1.05 for r in ratios.values()), sorted(ratios.items())


def training_batch(path: str, sizes: list[tuple[int, int]], rows: int, seq: int, tmp_path) -> dict:
    """The model inputs the training data path makes of ``rows`` samples, each the images of ``sizes`` (files of those
    sizes, through the family's processor, layout and image loader) followed by text up to ``seq`` tokens."""
    from PIL import Image
    from transformers import AutoConfig

    from lvlm_region.data.images import ImageLoader

    config = AutoConfig.from_pretrained(path)
    family = families.get(config.model_type)
    processor = family.load_processor(path)
    layout = family.image_layout(config, processor, "square")
    loader = ImageLoader(processor.image_processor, "square", layout.tensor_keys)
    files = []
    for n, (w, h) in enumerate(sizes):
        files.append(str(tmp_path / f"image{n}.png"))
        Image.new("RGB", (w, h), (200, 30 * n, 60)).save(files[-1])
    image_ids = [i for ids in layout.sample_token_ids(sizes) for i in ids]
    text = next(i for i in range(len(processor.tokenizer)) if i not in image_ids)
    ids = torch.tensor([image_ids + [text] * (seq - len(image_ids))] * rows)
    tensors = [layout.load_sample(loader, files) for _ in range(rows)]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             **{k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}}
    inputs = layout.model_inputs(batch)
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    return inputs


TILED = {"internvl": "internvl.build", "llava_onevision": "llava_onevision.build", "idefics3": "idefics3.build",
         "smolvlm": "idefics3.build_smolvlm"}


@pytest.mark.parametrize("family", sorted(TILED))
def test_tiled_families_tiles_tokens_and_activations_match_the_processor_and_autograd(tmp_path, family):
    """InternVL, LLaVA-OneVision, Idefics3 and SmolVLM: for images of several sizes the planner's tiles are the
    image processor's pixel rows and its image tokens the training data path's (the family's layout), with the tiling
    settings of the checkpoint's image processor; the activations of a batch of such images within 5% of autograd
    (OneVision: one image, tiled and interpolated, and two images of one tile each)."""
    module, build = TILED[family].split(".")
    path = getattr(importlib.import_module(f"helpers.{module}"), build)(str(tmp_path / "m"))
    shapes = plan.Shapes(plan.Setting(model=path))
    processor = shapes.family.load_processor(path)
    layout = shapes.family.image_layout(shapes.config, processor, "square")
    from lvlm_region.data.images import ImageLoader
    loader = ImageLoader(processor.image_processor, "square", layout.tensor_keys)
    from PIL import Image
    for n, size in enumerate([(20, 20), (64, 40), (40, 90), (100, 100), (200, 30)]):
        Image.new("RGB", size, "red").save(tmp_path / f"s{n}.png")
        one = plan.Shapes(plan.Setting(model=path, data_image_sizes=(size,)))
        assert one.tokens()[0] == len(layout.token_ids(size)), size
        tiles = len(layout.load_sample(loader, [str(tmp_path / f"s{n}.png")])["pixel_values"])
        assert one.family.planned_tiles(one.config, one.image) == tiles, size
    if family == "internvl":  # of the data's image sizes, the one with the most tiles is planned for
        sizes = ((20, 20), (64, 40), (30, 30))
        assert plan.Shapes(plan.Setting(model=path, data_image_sizes=sizes)).image.size == (64, 40)
    cases = [([(64, 40)], 160)] + ([([(40, 90), (60, 40)], 64)] if family == "llava_onevision" else [])
    for sizes, seq in cases:
        inputs = training_batch(path, sizes, 2, seq, tmp_path)
        ratios = compare(path, inputs, inputs["input_ids"].clone(), seq,
                         ("uniform25", "full", "none", "last25-projector", "uniform25+vision"),
                         data_image_sizes=tuple(sizes[:1]), images=len(sizes))
        assert all(0.95 <= r <= 1.05 for r in ratios.values()), (sizes, sorted(ratios.items()))


BUILD = {"llava": None, "llava_next": "llava_next.build", "gemma3": "gemma3.build", **TILED,
         **{f: f"qwen.build:{f}" for f in QWEN}}


def test_every_family_that_trains_is_planned(demo_dir, tmp_path, capsys):
    """launch/plan.py makes a plan (a fitting candidate, for the region and for full tuning) for every family that
    trains, from each tiny checkpoint; nothing is refused."""
    assert sorted(BUILD) == sorted(families.trainable())
    for family, build in BUILD.items():
        if build is None:
            path = str(demo_dir / "base_model")
        else:
            where, _, arg = build.partition(":")
            module, fn = where.split(".")
            out = str(tmp_path / family)
            path = getattr(importlib.import_module(f"helpers.{module}"), fn)(*([out, arg] if arg else [out]))
        report = tmp_path / f"{family}.json"
        assert launcher()(["--model", path, "--gpus", "2", "--global-batch", "8", "--seq-len", "256",
                           "--json", str(report)]) == 0, capsys.readouterr().err
        got = json.loads(report.read_text())
        assert got["best"]["fits"] and got["full_best"]["fits"], family
        assert 0 < got["parameters"]["trainable"] < got["parameters"]["trainable_full"], family


MEAN_LENGTH = 850  # LLaVA-665K's mean sample length as estimated (576 image tokens + the conversation); not measured
PUBLISHED = {"llava-1.5-7b": 80.0, "llava-1.5-13b": 160.0}  # GPU-hours of LLaVA-1.5's SFT on 8 A100s (~10 h, ~20 h)


def test_llavas_recipe_projects_within_20_percent_of_its_published_times(tmp_path):
    """LLaVA's own recipe (ZeRO-3, checkpointing, micro-batch 16 on 8 A100-80GB) at LLaVA-665K's mean length, as the
    planner projects it (the assumed MFU on model FLOPs, recomputation extra), against LLaVA-1.5's published SFT
    times; README's figures are this plan's, and both best plans are ZeRO-2 without checkpointing, as it says."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    for name, hours in PUBLISHED.items():
        out = plan.plan(plan.Setting(model=str(CONFIGS / name), gpus=8, gpu="A100-80GB", region="uniform25",
                                     seq_len=MEAN_LENGTH))
        recipe = next(c for c in out["full_candidates"]
                      if (c["zero"], c["offload"], c["grad_ckpt"], c["micro_batch"]) == (3, False, True, 16))
        assert abs(recipe["gpu_hours"] / hours - 1) < 0.2, (name, recipe["gpu_hours"])
        assert f"{recipe['gpu_hours']:.1f}" in readme
        assert recipe["mfu"] < 0.25 < recipe["hfu"]  # ZeRO-3's gathers below, the recomputation above
        bests = (out["best"], out["full_best"])
        assert [(c["zero"], c["grad_ckpt"]) for c in bests] == [(2, False), (2, False)]
        if name == "llava-1.5-7b":
            assert f"needs {out['gpu_hours_ratio']:.3f} of the best full-tuning plan's GPU-hours" in readme
            assert f"{out['best']['gpu_hours'] / recipe['gpu_hours']:.2f} of LLaVA's recipe's" in readme
    assert "Both best plans are ZeRO-2 without checkpointing" in readme


def test_the_plan_for_llava_7b_on_8_a100s(tmp_path, capsys):
    code = launcher()(["--model", str(CONFIGS / "llava-1.5-7b"), "--gpus", "8", "--gpu", "A100-80GB", "--region",
                       "uniform25", "--seq-len", "2048", "--json", str(tmp_path / "p.json")])
    stdout = capsys.readouterr().out
    assert code == 0
    out = json.loads((tmp_path / "p.json").read_text())
    cands, full = out["candidates"], out["full_candidates"]
    assert len(cands) == len(full) == 2 * 2 * 2 * 5  # micro-batch 1..16: 128 samples on 8 GPUs
    for c in cands + full:
        assert c["micro_batch"] * c["grad_accum"] * 8 == 128
        m = c["memory_gb"]
        assert m["total"] == pytest.approx(m["model_states"] + m["activations"] + m["recompute"] + m["allowance"])
        assert c["fits"] == (m["total"] <= 79.2)  # what torch reports for an A100-80GB, in GiB
        assert (m["recompute"] > 0) == c["grad_ckpt"]
    best = out["best"]
    assert best == min((c for c in cands if c["fits"]), key=lambda c: (c["step_s"], c["memory_gb"]["total"]))
    assert out["full_best"] == min((c for c in full if c["fits"]),
                                   key=lambda c: (c["step_s"], c["memory_gb"]["total"]))
    assert out["gpu_hours_ratio"] == pytest.approx(best["gpu_hours"] / out["full_best"]["gpu_hours"])
    assert 0.6 < out["gpu_hours_ratio"] < 0.9  # a quarter of the layers' backward, less gradient traffic
    # the region frees memory: its best fits a micro-batch without checkpointing that full tuning's ZeRO-2 cannot
    def at(cs, **k):
        return next(c for c in cs if all(c[x] == v for x, v in k.items()))
    same = dict(zero=2, offload=False, grad_ckpt=False, micro_batch=4)
    assert at(cands, **same)["fits"] and not at(full, **same)["fits"]
    assert at(cands, **same)["memory_gb"]["model_states"] < at(full, **same)["memory_gb"]["model_states"]
    # activations grow with the micro-batch, checkpointing cuts them, ZeRO-3 shrinks the model states
    assert at(cands, **{**same, "micro_batch": 8})["memory_gb"]["activations"] == pytest.approx(
        2 * at(cands, **same)["memory_gb"]["activations"], rel=1e-6)
    assert at(cands, **{**same, "grad_ckpt": True})["memory_gb"]["activations"] < \
        at(cands, **same)["memory_gb"]["activations"] / 4
    assert at(cands, **{**same, "zero": 3})["memory_gb"]["model_states"] < at(cands, **same)["memory_gb"][
        "model_states"] / 2
    assert "gpu_hours_ratio (best / best full):" in stdout and "| uniform25 | 2 | no | no |" in stdout
    # a smaller GPU: fewer candidates fit
    assert launcher()(["--model", str(CONFIGS / "llava-1.5-7b"), "--gpu-memory-gb", "24", "--gpu", "other",
                       "--peak-tflops", "100", "--json", str(tmp_path / "s.json")]) == 0
    small = json.loads((tmp_path / "s.json").read_text())
    assert sum(c["fits"] for c in small["candidates"]) < sum(c["fits"] for c in cands)
    assert small["setting"]["peak_tflops"] == 100


def test_a_run_calibrates_the_mfu_and_prepared_data_the_shape(sft_uniform25):
    run_json = json.loads((sft_uniform25 / "run.json").read_text())
    assert plan.calibrated(str(sft_uniform25)) == (run_json["timing"]["mfu"], run_json["timing"]["hfu"])
    prepared = sft_uniform25 / "prepared" / "train"
    shape = plan.from_prepared(str(prepared))
    from lvlm_region.data.prepare import load_prepared
    from collections import Counter

    ds, _ = load_prepared(str(prepared))
    lengths = sorted(ds["length"])
    assert (shape["seq_len"], shape["fit_len"]) == (lengths[int(0.95 * len(lengths))], lengths[-1])
    assert shape["lengths"] == tuple(sorted(Counter(lengths).items()))  # every sample's length
    assert shape["images"] == 1
    from PIL import Image
    folder = json.loads((prepared / "prepare.json").read_text())["identity"]["image_folder"]
    sizes = set()
    for row in ds["images"]:
        for name in row:
            with Image.open(f"{folder}/{name}") as im:
                sizes.add(im.size)
    assert shape["data_image_sizes"] == tuple(sorted(sizes))  # from the files' headers
    fraction = shape["trained_fraction"]
    labels = ds["labels"]  # fewer than 10,000 samples: all of them are read
    assert fraction == pytest.approx(sum(sum(x != -100 for x in lab) for lab in labels) / sum(map(len, labels)))
    assert 0 < fraction < 0.5  # the demo's replies are a few words after a long prompt and the image


@pytest.mark.parametrize("args,message", [
    (["--gpu", "B200"], "--gpu 'B200' is not in the table"),
    (["--global-batch", "12"], "--global-batch 12 must be a positive multiple of --gpus 8"),
    (["--region", "uniform200"], "--region: invalid region spec"),
    (["--calibrate", "nowhere"], "--calibrate nowhere: no run.json there"),
    (["--assumed-mfu", "0"], "--assumed-mfu must be a finite number in (0, 1], got 0.0"),
    (["--data", "docs"], "--data docs is not a prepared directory"),
    (["--lengths", "nowhere.txt"], "--lengths nowhere.txt: no such file"),
    (["--lengths", "setup.py"], "--lengths setup.py line 1: '"),
    (["--lengths", "ds_configs/zero2.json"], "--lengths ds_configs/zero2.json: 'zero_optimization': {"),
    (["--lengths", "setup.py", "--data", "docs"], "give --data or --lengths, not both"),
    (["--gpu", "B200", "--gpu-memory-gb", "180", "--peak-tflops", "0"], "--peak-tflops must be a finite number > 0"),
    (["--gpu-memory-gb", "-1"], "--gpu-memory-gb must be a finite number > 0"),
])
def test_bad_input_is_refused(args, message, capsys):
    assert launcher()(["--model", str(CONFIGS / "llava-1.5-7b"), *args]) == 2
    assert message in capsys.readouterr().err


def test_the_step_time_batches_the_lengths_as_the_run_does(tmp_path, capsys):
    """With a length histogram the epoch's micro-batches are the run's: length-grouped ones run at their longest
    sample, random ones at theirs (never faster), packed ones at each sample's own length (never slower than
    padding); a histogram of one length is the --seq-len plan. --lengths reads JSON or lines; the calibrated HFU is
    the rate every plan runs at; overlap_comm hides the gradient reduction behind the backward pass."""
    base = dict(model=str(CONFIGS / "llava-1.5-7b"), gpus=2, global_batch=8, samples=512, region="uniform25")
    lengths = ((100, 256), (1000, 256))
    grouped = plan.Shapes(plan.Setting(**base, lengths=lengths, fit_len=1000))
    shuffled = plan.Shapes(plan.Setting(**base, lengths=lengths, fit_len=1000, group_by_length=False))
    # grouped as the sampler groups: mega-batches of 16 global micro-steps sorted, so at most one mixed step in each
    steps = grouped.batched(4)
    mixed = [len(set(x.ravel())) > 1 for x in steps]
    assert steps.shape == (64, 2, 4) and sum(mixed) <= 4 < sum(len(set(x.ravel())) > 1 for x in shuffled.batched(4))
    w = plan.epoch_flops(grouped, "uniform25", False, 4)
    by_hand = sum(max(grouped.flops("uniform25", False, 4, int(rank.max())).hardware for rank in x) for x in steps)
    assert w["slowest"] == pytest.approx(by_hand)
    packed = plan.Shapes(plan.Setting(**base, lengths=lengths, fit_len=1000, group_by_length=False, packing=True))
    work = {k: plan.epoch_flops(sh, "uniform25", False, 4)["slowest"]
            for k, sh in (("shuffled", shuffled), ("packed", packed))}
    assert work["packed"] < work["shuffled"] and w["slowest"] < work["shuffled"]
    assert plan.epoch_flops(packed, "uniform25", False, 4)["model"] < w["model"]  # packed: no padding at all
    # one length: the same plan as --seq-len
    one = plan.plan(plan.Setting(**base, lengths=((512, 512),), fit_len=512))
    flat = plan.plan(plan.Setting(**base, seq_len=512))
    assert [c["gpu_hours"] for c in one["candidates"]] == pytest.approx([c["gpu_hours"] for c in flat["candidates"]])
    # --lengths: JSON or lines, the longest sets the memory's length
    (tmp_path / "l.json").write_text(json.dumps({"100": 256, "1000": 256}))
    (tmp_path / "l.txt").write_text("# length samples\n100 256\n1000, 200\n1000 56\n")
    assert plan.read_lengths(str(tmp_path / "l.json")) == plan.read_lengths(str(tmp_path / "l.txt")) == {
        "lengths": lengths, "fit_len": 1000}
    assert launcher()(["--model", base["model"], "--gpus", "2", "--global-batch", "8", "--lengths",
                       str(tmp_path / "l.txt"), "--json", str(tmp_path / "p.json")]) == 0
    assert "512 samples" not in capsys.readouterr().out  # the histogram's sample count does not replace --samples
    got = json.loads((tmp_path / "p.json").read_text())
    assert got["setting"]["lengths"] == 2 and got["setting"]["mean_length"] == 550
    # a calibrated HFU is the rate: one GPU moves nothing, so the plan's HFU is the run's
    solo = plan.plan(plan.Setting(**{**base, "gpus": 1}, seq_len=512, hfu=0.4, mfu=0.3, mfu_source="run"))
    assert all(c["hfu"] == pytest.approx(0.4) for c in solo["candidates"] if not c["offload"])
    # overlap_comm: the reduction hides behind the backward pass, up to its length
    assert plan.transfer_seconds(10**9, 10**9, 2, False, 4, 8, hidden=0.0) == pytest.approx(
        4 * 2 * 10**9 * 7 / 8 / (plan.NVLINK_GBPS * 1e9))
    assert plan.transfer_seconds(10**9, 10**9, 2, False, 4, 8, hidden=1.0) == 0
    overlapped = plan.plan(plan.Setting(**base, seq_len=512, overlap_comm=True))
    plain = plan.plan(plan.Setting(**base, seq_len=512))
    assert all(a["step_s"] < b["step_s"] for a, b in zip(overlapped["candidates"], plain["candidates"]))


def test_a_model_without_config_is_refused(tmp_path):
    res = run([sys.executable, "launch/plan.py", "--model", str(tmp_path)], timeout=120)  # the real command line
    assert res.returncode == 2 and "no config.json" in res.stderr and not list(tmp_path.iterdir())


def test_a_lora_plan_counts_the_adapters_and_compares_with_full_tuning(tmp_path, capsys):
    assert launcher()(["--model", str(CONFIGS / "llava-1.5-7b"), "--tuner", "lora", "--lora-r", "128", "--json",
                       str(tmp_path / "l.json")]) == 0
    out = json.loads((tmp_path / "l.json").read_text())
    shapes = plan.Shapes(plan.Setting(model=str(CONFIGS / "llava-1.5-7b")))
    layers = regions.resolve("uniform25", shapes.depth).layers
    adapters = sum(128 * (m.in_features + m.out_features) for i in layers for m in shapes.parts.layers[i].modules()
                   if isinstance(m, torch.nn.Linear))
    projector = sum(p.numel() for p in shapes.parts.projector.parameters())
    assert out["parameters"]["trainable"] == adapters + projector  # r x (in + out) per linear of the 8 layers
    assert out["parameters"]["trainable_full"] == shapes.trainable("full")
    full_tuned = json.loads((tmp_path / "l.json").read_text())["full_candidates"]
    same = next(c for c in out["candidates"] if (c["zero"], c["offload"], c["grad_ckpt"], c["micro_batch"]) ==
                (2, False, False, 4))
    base = next(c for c in full_tuned if (c["zero"], c["offload"], c["grad_ckpt"], c["micro_batch"]) ==
                (2, False, False, 4))
    assert same["memory_gb"]["model_states"] < base["memory_gb"]["model_states"] / 1.5
    assert out["gpu_hours_ratio"] < 1


@pytest.fixture(scope="module")
def prepared_subset(demo_dir, tmp_path_factory):
    """32 demo stage-2 samples prepared for the demo model (as data_prep/prepare.py does for a user)."""
    tmp = tmp_path_factory.mktemp("plan_auto")
    (tmp / "sft.json").write_text(json.dumps(json.loads((demo_dir / "sft_train.json").read_text())[:32]))
    res = run([sys.executable, "data_prep/prepare.py", "--data", str(tmp / "sft.json"), "--image-folder",
               str(demo_dir), "--model", str(demo_dir / "base_model"), "--output", str(tmp / "prepared")])
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp / "prepared"


def run_setting(demo_dir, prepared, gpus: int, memory: float) -> plan.Setting:
    """The Setting a uniform25 run on ``prepared`` with --peak-tflops 1 and --global-batch 8 asks the planner for."""
    from lvlm_region.data.prepare import load_prepared

    return plan.Setting(model=str(demo_dir / "base_model"), region="uniform25", gpus=gpus, gpu="cpu",
                        gpu_memory_gb=memory, peak_tflops=1.0, **plan.data_shape(load_prepared(str(prepared))[0]),
                        samples=32, global_batch=8, precision="fp32")  # a CPU run's precision


def test_a_moving_region_is_never_planned_as_zero3_with_checkpointing(demo_dir, prepared_subset):
    """--region-schedule cannot run ZeRO-3 with --grad-ckpt (run_setup.MOVING_ZERO3_CKPT): --plan auto leaves those
    candidates out, and only those."""
    setting = run_setting(demo_dir, prepared_subset, 2, 1000.0)
    _, every = plan.choose(setting, {})
    _, moving = plan.choose(setting, {}, moving=True)
    assert {(c.zero, c.grad_ckpt) for c in every} == {(2, False), (2, True), (3, False), (3, True)}
    assert moving == [c for c in every if not (c.zero == 3 and c.grad_ckpt)]
    assert plan.choose(setting, {"zero": 3, "grad_ckpt": True}, moving=True) == (None, [])


def test_plan_auto_runs_the_fastest_plan_that_fits_and_explicit_flags_win(demo_dir, prepared_subset, tmp_path):
    from conftest import deepspeed_cmd

    roomy, _ = plan.choose(run_setting(demo_dir, prepared_subset, 2, 1000.0), {})
    assert (roomy.zero, roomy.offload, roomy.grad_ckpt, roomy.micro_batch) == (2, False, False, 4)  # the simplest
    # A GPU just too small for that: the plan must give up something (checkpointing or a smaller micro-batch).
    memory = roomy.memory_gb["total"] - 1e-6
    want, cands = plan.choose(run_setting(demo_dir, prepared_subset, 2, memory), {})
    assert want is not None and (want.grad_ckpt, want.micro_batch) != (False, 4)
    assert not next(c for c in cands if (c.zero, c.offload, c.grad_ckpt, c.micro_batch) == (2, False, False, 4)).fits
    common = ["--data", str(prepared_subset), "--plan", "auto", "--gpu-memory-gb", repr(memory), "--peak-tflops", "1",
              "--global-batch", "8", "--max-steps", "2", "--num-workers", "0", "--no-export-model"]
    out = tmp_path / "auto"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *common))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rec = json.loads((out / "run.json").read_text())
    assert rec["plan"]["chosen"] == json.loads(json.dumps(plan.asdict(want)))
    assert rec["plan"]["kept"] == [] and rec["plan"]["fitting"] == sum(c.fits for c in cands)
    c, ds = rec["config"], rec["ds_config"]
    assert (c["zero"], c["offload"], c["grad_ckpt"], c["micro_batch"], c["grad_accum"]) == \
        (want.zero, want.offload, want.grad_ckpt, want.micro_batch, want.grad_accum)
    assert (ds["zero_optimization"]["stage"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (want.zero, want.micro_batch, want.grad_accum, 8)
    assert rec["status"] == "complete" and rec["steps"] == 2
    assert "--plan auto (" in res.stdout and plan.row("uniform25", plan.asdict(want)) in res.stdout

    # Flags given on the command line keep their values; the plan fills the rest among the candidates that agree.
    want3, _ = plan.choose(run_setting(demo_dir, prepared_subset, 2, memory), {"zero": 3, "micro_batch": 1})
    out3 = tmp_path / "explicit"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out3), *common, "--zero", "3", "--micro-batch",
                            "1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rec = json.loads((out3 / "run.json").read_text())
    assert rec["plan"]["kept"] == ["--zero", "--micro-batch"]
    assert rec["plan"]["chosen"] == json.loads(json.dumps(plan.asdict(want3)))
    assert (rec["config"]["zero"], rec["config"]["micro_batch"], rec["config"]["grad_accum"]) == (3, 1, 4)
    assert rec["ds_config"]["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("flags,message", [
    (["--plan", "auto"], "--plan auto on CPU needs --gpu-memory-gb"),
    (["--gpu-memory-gb", "80"], "--gpu-memory-gb is what --plan auto fits the run in; add --plan auto"),
    (["--plan", "auto", "--gpu-memory-gb", "1"], "--plan auto: nothing fits 1 GiB per GPU with global batch 8 on 1 "
                                                 "rank (the smallest, | uniform25 | 2 | yes | yes | 1 | 8 |"),
    (["--plan", "auto", "--gpu-memory-gb", "80", "--micro-batch", "3"],
     "--plan auto: --micro-batch 3 is not one of the values the planner tries for global batch 8 on 1 rank(s) "
     "(1, 2, 4, 8: micro-batches of 1, 2, 4, 8, 16, 32, 64 that divide it); give one of them, or drop --micro-batch"),
    (["--plan", "auto", "--gpu-memory-gb", "80", "--attn", "eager"], "eager attention's T x T weights are not "
                                                                      "modelled"),
    (["--global-batch", "12", "--micro-batch", "8"], "--global-batch 12 is not a multiple of --micro-batch 8 x 1 "
                                                      "ranks"),
    (["--global-batch", "16", "--micro-batch", "8", "--grad-accum", "4"], "but --grad-accum 4 was given"),
])
def test_plan_auto_refuses_before_weights_load(demo_dir, prepared_subset, tmp_path, flags, message):
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "out"), "--data", str(prepared_subset),
               "--global-batch", "8", *flags] if "--global-batch" not in flags else
              [sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "out"), "--data", str(prepared_subset),
               *flags], timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert message in res.stderr
    assert "Loading weights" not in res.stdout + res.stderr


def test_stage_1_takes_plan_auto_too(tmp_path):
    res = run([sys.executable, "launch/pretrain.py", "--output-dir", str(tmp_path / "out"), "--plan", "auto"],
              timeout=300)
    assert res.returncode == 2 and "--plan auto on CPU needs --gpu-memory-gb" in res.stderr, res.stderr[-2000:]


def test_the_plan_follows_the_runs_precision_and_the_longest_batchs_trained_share(demo_dir, prepared_subset):
    """--plan auto planned bf16 whatever --precision said (an fp32 run got a plan at about half its memory), and
    counted the LM head's memory at the mean trained share while length grouping batches the longest samples."""
    bf16 = run_setting(demo_dir, prepared_subset, 1, 1000.0)
    bf16.precision = "bf16"
    fp32 = run_setting(demo_dir, prepared_subset, 1, 1000.0)
    a, b = (plan.Shapes(x) for x in (bf16, fp32))
    # every bf16 activation doubles; the fp32 loss, attention's log-sum-exp and integer indices do not
    assert 1.6 < b.activations("uniform25", False, 2)[0] / a.activations("uniform25", False, 2)[0] < 2
    full = plan.Shapes(bf16).trainable("uniform25")
    bf, fp = (timing.model_states(a.total, full, 2, 1, p, False)["total_on_device"] for p in ("bf16", "fp32"))
    c16, _ = plan.choose(bf16, {"micro_batch": 4, "grad_ckpt": False, "zero": 2, "offload": False})
    c32, _ = plan.choose(fp32, {"micro_batch": 4, "grad_ckpt": False, "zero": 2, "offload": False})
    assert c32.memory_gb["model_states"] * plan.GIB == pytest.approx(fp)
    assert c16.memory_gb["model_states"] * plan.GIB == pytest.approx(bf) and fp > bf
    # the trained share of the longest samples (as many as the largest micro-batch), by hand
    from lvlm_region.data.prepare import load_prepared
    ds, _ = load_prepared(str(prepared_subset))
    shape = plan.data_shape(ds)
    longest = sorted(range(len(ds)), key=lambda i: -ds[i]["length"])[:64]
    labels = [ds[i]["labels"] for i in longest]
    assert shape["fit_trained_fraction"] == pytest.approx(
        sum(sum(x != -100 for x in lab) for lab in labels) / sum(map(len, labels)))
    more = plan.Shapes(plan.replace(fp32, fit_trained_fraction=1.0)).activations("uniform25", False, 2)[0]
    less = plan.Shapes(plan.replace(fp32, fit_trained_fraction=0.01)).activations("uniform25", False, 2)[0]
    assert more > less


def test_plan_auto_never_adds_offload_to_the_users_deepspeed_json(demo_dir, prepared_subset, tmp_path):
    """With --ds-config, the JSON decides the ZeRO stage and the offload; a memory only offload would fit is
    refused instead of writing an offload section into the user's config."""
    _, cands = plan.choose(run_setting(demo_dir, prepared_subset, 1, 1000.0), {"zero": 2})
    plain = min(c.memory_gb["total"] for c in cands if not c.offload)
    offloaded = min(c.memory_gb["total"] for c in cands if c.offload)
    assert offloaded < plain
    memory = (plain + offloaded) / 2
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "out"), "--data", str(prepared_subset),
               "--global-batch", "8", "--plan", "auto", "--gpu-memory-gb", repr(memory), "--ds-config",
               "ds_configs/zero2.json"], timeout=300)
    assert res.returncode == 2 and f"--plan auto: nothing fits {memory:g} GiB per GPU" in res.stderr, res.stderr[-2000:]
    assert "--ds-config" in res.stderr and "Loading weights" not in res.stdout + res.stderr
