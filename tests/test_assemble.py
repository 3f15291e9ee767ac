"""Stage 1 from separate parts: tiny random LLM / CLIP / SigLIP checkpoints in their real formats -> Llava."""
import json
import sys

import pytest
import torch
from PIL import Image
from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          CLIPVisionModel, SiglipVisionModel)

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "helpers"))
import parts  # noqa: E402

from conftest import deepspeed_cmd, run  # noqa: E402
from lvlm_region.model.assemble import assemble  # noqa: E402
from lvlm_region.data.templates import BUILTIN, VICUNA_SYSTEM  # noqa: E402
from lvlm_region.model.families import find_parts  # noqa: E402

TOWER = {"clip": (parts.clip, CLIPVisionModel, "default"), "siglip": (parts.siglip, SiglipVisionModel, "full")}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("family", ["llama", "mistral", "phi3", "qwen2"])
def test_assembled_model_loads_with_auto_class_and_generates(tmp_path, family, vision):
    make_tower, tower_cls, strategy = TOWER[vision]
    llm_dir, vis_dir = parts.llm(tmp_path / "llm", family), make_tower(tmp_path / vision)
    out = assemble(str(llm_dir), str(vis_dir), "mlp2x_gelu", str(tmp_path / "out"),
                   chat_template=BUILTIN["vicuna_v1"])
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == strategy

    # The parts are the checkpoints' own weights: every decoder layer, the final norm, the vision encoder.
    src = AutoModelForCausalLM.from_pretrained(llm_dir)
    got = find_parts(model)
    assert len(got.layers) == 4
    assert all(same(a.state_dict(), b.state_dict()) for a, b in zip(src.get_decoder().layers, got.layers))
    assert same(src.get_decoder().norm.state_dict(), got.norm.state_dict())
    assert same(tower_cls.from_pretrained(vis_dir).state_dict(), got.vision.state_dict())

    # The tokenizer gained <image> (pad: the LLM tokenizer's own, else unk); embeddings and LM head grew to the
    # tokenizer's length with the old rows unchanged. (transformers loads a qwen2 tokenizer.json as Qwen2Tokenizer,
    # which brings <|endoftext|> as its pad token.)
    tok, src_tok = processor.tokenizer, AutoTokenizer.from_pretrained(llm_dir)
    n_words = len(parts.WORDS)
    assert len(tok) == len(src_tok) + 1 and tok.convert_tokens_to_ids("<image>") == len(src_tok)
    assert model.config.image_token_id == len(src_tok)
    assert tok.pad_token == ("<|endoftext|>" if family == "qwen2" else "<unk>")
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) and torch.equal(emb[:n_words], src.get_input_embeddings().weight)
    if family == "qwen2":  # tied in the source LLM, tied in the assembled model
        assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    else:
        assert torch.equal(model.get_output_embeddings().weight[:n_words], src.get_output_embeddings().weight)

    # Chat template (the run's --template vicuna_v1 written in; the tiny LLM has none), image size from the vision
    # checkpoint, 4 image tokens (32 / 16 squared; CLIP's class token dropped), then generation.
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what is in the top left"}]}], add_generation_prompt=True)
    assert prompt == VICUNA_SYSTEM + " USER: <image>\nwhat is in the top left ASSISTANT:"
    inputs = processor(images=Image.new("RGB", (50, 40), "red"), text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert ids.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_an_llm_chat_template_is_kept(tmp_path):
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    out = assemble(str(parts.llm(tmp_path / "llm", "phi3", chat_template=template)), str(parts.siglip(tmp_path / "v")),
                   "mlp2x_gelu", str(tmp_path / "out"))
    assert AutoProcessor.from_pretrained(out).tokenizer.chat_template == template


@pytest.mark.parametrize("case,message", [
    ("vision_is_llm", "--vision {vision}: config.json has model_type 'llama', not a CLIP or SigLIP vision model"),
    ("no_preprocessor", "--vision {vision}: no preprocessor_config.json"),
    ("missing_llm", "--llm {llm}: no config.json there"),
    ("projector", "--projector 'linear': only mlp2x_gelu is supported"),
])
def test_bad_parts_fail_before_loading_with_the_file_named(demo_dir, tmp_path, case, message):
    llm, vision, projector = parts.llm(tmp_path / "llm", "llama"), parts.clip(tmp_path / "clip"), "mlp2x_gelu"
    if case == "vision_is_llm":
        vision = llm
    elif case == "no_preprocessor":
        (vision / "preprocessor_config.json").unlink()
    elif case == "missing_llm":
        llm = tmp_path / "nope"
    else:
        projector = "linear"
    out = tmp_path / "run"
    res = run([sys.executable, "launch/pretrain.py", "--llm", str(llm), "--vision", str(vision), "--projector",
               projector, "--data", "data/demo/pretrain.json", "--output-dir", str(out)])
    assert res.returncode == 2
    assert message.format(llm=llm, vision=vision) in res.stderr
    assert not (out / "base_model").exists()  # nothing was built


def test_sft_from_an_llm_without_a_chat_template_needs_a_template_flag(demo_dir, tmp_path):
    llm, vision = parts.llm(tmp_path / "llm", "llama"), parts.clip(tmp_path / "clip")  # no chat template
    out = tmp_path / "run"
    res = run([sys.executable, "launch/sft.py", "--llm", str(llm), "--vision", str(vision), "--data",
               "data/demo/sft_train.json", "--output-dir", str(out)])
    assert res.returncode == 2
    assert (f"the tokenizer of --llm {llm} has no chat template (tokenizer_config.json / chat_template.jinja), and "
            "conversations need one; pass --template with the format the LLM was trained in: vicuna_v1") in res.stderr
    assert not (out / "base_model").exists()


def test_pretrain_from_parts_on_two_ranks_trains_only_the_projector(demo_dir, tmp_path):
    llm, vision = parts.llm(tmp_path / "llm", "llama"), parts.siglip(tmp_path / "siglip")
    out = tmp_path / "run"
    res = run(deepspeed_cmd(2, "launch/pretrain.py", "--llm", str(llm), "--vision", str(vision), "--data",
                            "data/demo/pretrain.json", "--output-dir", str(out), "--max-steps", "2", "--micro-batch",
                            "4", "--num-workers", "0", "--log-every", "1", "--zero", "3"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"assembled {llm} + {vision} (mlp2x_gelu, full features, 4 image tokens)" in res.stdout
    base = AutoModelForImageTextToText.from_pretrained(out / "base_model").state_dict()
    trained = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    summary = json.loads((out / "run.json").read_text())
    assert summary["config"]["llm"] == str(llm) and summary["status"] == "complete"
