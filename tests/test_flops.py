"""The FLOP model against hand counts and against torch.utils.flop_counter on a real tiny Llava."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lvlm_region.model.families import flop_model
from lvlm_region.model.flops import BatchShape, Block, FlopModel
from lvlm_region.data.demo import build_demo_model
from lvlm_region.model.load import enable_checkpointing
from lvlm_region.model.trainable import apply_region
from lvlm_region.model.regions import resolve


def llm_only(n_layers: int, macs: int = 1000) -> FlopModel:
    """Decoder layers only (no attention, free head), so ratios are pure layer counts."""
    blocks = [Block("projector", "projector", 0, 0), Block("embed", "embed", 0, 0)]
    blocks += [Block(f"layer.{i}", "llm", macs, 0) for i in range(n_layers)]
    blocks.append(Block("lm_head", "lm_head", 0, 0))
    return FlopModel(blocks, image_positions=0, image_tokens=0, patches=0)


def test_selective_ratios_by_hand():
    fm, shape = llm_only(32), [BatchShape(rows=1, seq_len=10, images=0)]
    full = fm.for_region(resolve("full", 32)).step(shape)
    u25 = fm.for_region(resolve("uniform25", 32)).step(shape)
    assert full.model == 2 * 10 * 1000 * 96  # forward + activation + weight gradient for 32 layers
    assert u25.model / full.model == pytest.approx((32 + 32 + 8) / 96)
    ck = lambda spec: fm.for_region(resolve(spec, 32), checkpointing=True).step(shape).hardware  # noqa: E731
    assert ck("uniform25") / ck("full") == pytest.approx((32 + 64 + 8) / 128)
    # contiguous top 8 with a frozen projector: the backward stops at layer 24
    assert fm.for_region(resolve("last:8-projector", 32)).step(shape).model / full.model == pytest.approx(48 / 96)
    # 6N per token would say 1.0 for any selection; stage 1 (projector only) still pays every activation grad
    assert fm.for_region(resolve("none", 32)).step(shape).model / full.model == pytest.approx(64 / 96)


@pytest.fixture()
def model():
    m = build_demo_model(vocab_size=160, image_token_id=4, pad_token_id=3, seed=0)
    m.config._attn_implementation = "eager"  # explicit matmuls, which the flop counter sees on CPU
    for cfg in (m.config.text_config, m.config.vision_config):
        cfg._attn_implementation = "eager"
    return m.train()


def test_block_shapes_of_the_demo_model_by_hand(model):
    apply_region(model, resolve("uniform25", 8))
    fm = flop_model(model)
    by = {b.name: b for b in fm.blocks}
    # text: h 128, ffn 256, 4 heads x 32, 2 kv heads: q 128x128, k/v 128x64, o 128x128, gate/up/down 128x256
    assert by["layer.0"].macs == 16384 + 8192 + 8192 + 16384 + 3 * 32768 == 147456
    assert by["layer.0"].trainable_macs == 147456 and by["layer.1"].trainable_macs == 0
    assert by["vision.0"].macs == 4 * 64 * 64 + 2 * 64 * 128 == 32768  # q k v o + fc1 fc2
    assert by["vision.embed"].macs == 3 * 16 * 16 * 64  # patch conv per patch
    assert by["projector"].macs == 64 * 128 + 128 * 128 and by["projector"].input_macs == 64 * 128
    assert by["lm_head"].macs == 128 * 160 and by["lm_head"].trainable_macs == 0
    assert (fm.patches, fm.image_positions, fm.image_tokens) == (4, 5, 4)  # 32 px / 16 px patches, + CLS


def counted(model, rows: int, seq_len: int, images: int) -> float:
    torch.manual_seed(0)
    ids = torch.randint(10, 160, (rows, seq_len))
    for i in range(images):  # image i's 4 tokens go into row i
        ids[i, 1:5] = 4
    pixels = torch.randn(images, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("spec,ckpt", [("none", False), ("uniform25", False), ("layers:2,5-projector", False),
                                       ("full+vision+lm_head", False), ("uniform25", True),
                                       ("layers:3-projector+norm", True), ("uniform25.mlp", False),
                                       ("layers:2,5.attn", False), ("uniform25.attn", True)])
def test_matches_torch_flop_counter(model, spec, ckpt):
    apply_region(model, resolve(spec, 8))
    if ckpt:
        enable_checkpointing(model)
    fm = flop_model(model)
    ours = fm.micro_batch(BatchShape(rows=2, seq_len=12, images=2))
    assert ours.hardware == counted(model, 2, 12, 2)
    assert (ours.recompute > 0) == ckpt


@pytest.mark.parametrize("ckpt", [False, True])
def test_lora_counted_as_what_it_is(model, ckpt):
    # peft LoRA (r=4) on every linear of decoder layers 0 and 7, projector trained: adapters add their own small
    # matmuls, the frozen base weights need activation gradients only. (With the projector frozen, the lowest
    # LoRA layer's q/k/v would need no activation gradient; the model does not see that yet: see flops.py.)
    from peft import LoraConfig, inject_adapter_in_model
    apply_region(model, resolve("none", 8))  # projector only, everything else frozen
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                     target_modules=r".*language_model\.layers\.(0|7)\..*_proj")
    model = inject_adapter_in_model(cfg, model)  # (peft freezes everything but the adapters)
    for p in model.model.multi_modal_projector.parameters():  # the paper's recipe trains the projector fully
        p.requires_grad_(True)
    if ckpt:
        enable_checkpointing(model)
    by = {b.name: b for b in flop_model(model).blocks}
    per_token_lora = sum(4 * (i + o) for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256),
                                                    (128, 256), (256, 128)])  # A: in x r, B: r x out
    assert by["layer.0"].trainable_macs == per_token_lora and by["layer.1"].trainable_macs == 0
    assert by["layer.0"].macs == 147456 + per_token_lora
    ours = flop_model(model).micro_batch(BatchShape(rows=2, seq_len=12, images=2))
    assert ours.hardware == counted(model, 2, 12, 2)


def training_eagerly(model, spec: str, ckpt: bool):
    """``model`` (4 decoder layers) in train mode with eager attention (explicit matmuls, which the flop counter
    sees on CPU), region ``spec`` applied and checkpointing on when ``ckpt``."""
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg._attn_implementation = "eager"
    model.train()
    apply_region(model, resolve(spec, 4))
    if ckpt:
        enable_checkpointing(model)
    return model


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("spec,ckpt", [("none", False), ("layers:1,3", False), ("full+vision", True),
                                       ("layers:3-projector", False)])
def test_qwen_vision_per_image_grids_match_torch_flop_counter(family, spec, ckpt):
    """Qwen2-VL: each image's own patch grid, attention within the image; Qwen2.5-VL: within 56 px windows in
    its windowed block (the tiny tower's block 0), within the image in its full-attention block; Qwen3-VL: the
    merger and its two DeepStack mergers (one per vision layer) on the merged patches, their outputs added after
    decoder layers 0 and 1, so a trained projector puts every layer on the backward path."""
    from helpers import qwen
    model = training_eagerly(qwen.model(family), spec, ckpt)
    grids = ((1, 4, 6), (1, 10, 12))  # 6 and 30 tokens; the second spans 3 x 3 windows of 2 x 2 merged units
    T = 30 + 8
    counted = count_qwen_step(model, grids, T)
    fm = flop_model(model)
    if family == "qwen2_5_vl":
        assert [b.windowed for b in fm.blocks if b.kind == "vision"] == [True, False] and fm.grid.window == 2
    ours = fm.micro_batch(BatchShape(rows=2, seq_len=T, images=2, grids=grids))
    assert ours.hardware == counted.get_total_flops()
    assert (ours.recompute > 0) == ckpt


def count_qwen_step(model, grids, T: int) -> FlopCounterMode:
    """torch's count of one forward and backward of a Qwen-style ``model`` on 2 rows of ``T`` tokens, each with one
    image of the given grid (as the image processor would make it)."""
    c = model.config
    tokens = [t * h * w // 4 for t, h, w in grids]
    ids = torch.randint(0, 30, (2, T), generator=torch.Generator().manual_seed(0))
    for r, n in enumerate(tokens):
        ids[r, 1], ids[r, 2:2 + n], ids[r, 2 + n] = c.vision_start_token_id, c.image_token_id, c.vision_end_token_id
    patch = model.config.vision_config.patch_size
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * patch * patch)
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                       image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids == c.image_token_id).long()).logits
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter


def test_torch_counts_a_depthwise_convolutions_weight_gradient_once_per_channel_too_many():
    """torch.utils.flop_counter ignores ``groups`` in a convolution's weight gradient: for a depthwise convolution of
    C channels it counts C times the real matmul work (the forward and the input gradient are right). The Gated
    DeltaNet comparison below takes that excess off torch's count."""
    B, C, T, K = 2, 6, 10, 4
    x, w = torch.randn(B, C, T, requires_grad=True), torch.randn(C, 1, K, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.conv1d(x, w, padding=K - 1, groups=C)[:, :, :T].sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    real = 2 * B * (T + K - 1) * C * K
    assert counts == {"aten.convolution": real, "aten.convolution_backward": real + C * real}


def conv_weight_grad_excess(fm, rows: int, seq_len: int) -> int:
    """What torch's counter adds beyond the real work for the Gated DeltaNet convolutions whose weight trains: C - 1
    times each one's weight gradient (the test above), 2 x rows x (T + kernel - 1) x C x kernel FLOPs."""
    return sum((d.channels - 1) * 2 * rows * (seq_len + d.kernel - 1) * d.channels * d.kernel
               for d in (b.delta for b in fm.blocks) if d and d.conv_trainable)


@pytest.mark.parametrize("spec,ckpt", [("none", False), ("layers:1", False), ("layers:2-projector", False),
                                       ("full+vision", True)])
def test_gated_deltanet_layers_match_torch_flop_counter(spec, ckpt):
    """Qwen3.5 (helpers/qwen.py: layers 0, 1, 3 Gated DeltaNet, layer 2 attention): the causal convolution and the
    chunked delta rule on rows of exactly one chunk (64), of one position more (a second chunk of one) and of three
    chunks, the last one partial (150), under each kind of region. torch's count, less its excess on the depthwise
    convolution's weight gradient (the test above) for each layer whose convolution trains, is the model's."""
    from helpers import qwen
    model = training_eagerly(qwen.model("qwen3_5"), spec, ckpt)
    fm = flop_model(model)
    kinds = ["delta" if b.delta else "attention" for b in fm.blocks if b.kind == "llm"]
    assert kinds == ["delta", "delta", "attention", "delta"]
    grids = ((1, 4, 6), (1, 10, 12))
    for T in (64, 65, 150):
        counted = count_qwen_step(model, grids, T).get_total_flops()
        excess = conv_weight_grad_excess(fm, rows=2, seq_len=T)
        ours = fm.micro_batch(BatchShape(rows=2, seq_len=T, images=2, grids=grids))
        assert ours.hardware == counted - excess, T
        assert (ours.recompute > 0) == ckpt and (excess > 0) == (spec != "layers:2-projector" and spec != "none")


@pytest.mark.parametrize("spec", ["uniform25", "full+lm_head"])
def test_lm_head_on_the_trained_positions_only_matches_torch_flop_counter(model, spec):
    from lvlm_region.model.loss import loss_positions, token_loss_sum
    apply_region(model, resolve(spec, 8))
    torch.manual_seed(0)
    ids = torch.randint(10, 160, (2, 12))
    ids[:, 1:5] = 4
    labels = torch.full_like(ids, -100)
    labels[0, 8:], labels[1, 10:] = ids[0, 8:], ids[1, 10:]  # 6 trained positions
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 32, 32),
                       logits_to_keep=loss_positions(labels)).logits
        token_loss_sum(logits, labels).backward()
    model.zero_grad(set_to_none=True)
    fm = flop_model(model)
    ours = fm.micro_batch(BatchShape(rows=2, seq_len=12, images=2, head_tokens=6))
    assert ours.hardware == counter.get_total_flops()
    head = next(b for b in fm.blocks if b.kind == "lm_head")
    full = fm.micro_batch(BatchShape(rows=2, seq_len=12, images=2))
    assert full.forward - ours.forward == 2.0 * (24 - 6) * head.macs  # the head's forward on 18 untrained positions


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("spec,ckpt", [("none", False), ("uniform25", False), ("full+vision", True),
                                       ("layers:3-projector", False)])
def test_anyres_tiles_match_torch_flop_counter(family, spec, ckpt):
    """LLaVA-NeXT and LLaVA-OneVision: the tower and the projector once per tile (LLaVA-NeXT's CLIP: 5 patches with the
    class token, 4 projected; OneVision's SigLIP: 4 and 4), unpadding, OneVision's interpolation of large grids and
    image_newline cost no matmul; the LLM over the tokens left. OneVision's row 1 holds a two-image sample: one tile
    per image."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from helpers import llava_next, llava_onevision
    helper = {"llava_next": llava_next, "llava_onevision": llava_onevision}[family]
    model = training_eagerly(helper.model(), spec, ckpt)
    c = model.config
    sizes = [(40, 60), (90, 40)]  # (height, width): 5 and 3 tiles
    tiles = [image_size_to_num_patches(s, c.image_grid_pinpoints, 28) for s in sizes]
    extra = {}
    if family == "llava_next":
        proc = llava_next.processor()
        tokens = [proc._get_num_multimodal_tokens(image_sizes=[s])["num_image_tokens"][0] for s in sizes]
    else:
        proc = llava_onevision.processor()
        count = lambda s, n: proc.replace_image_token({"batch_num_images": [n], "image_sizes": [s],  # noqa: E731
                                                       "pixel_values": [torch.empty(1, 3, 28, 28)]}, 0).count("<image>")
        sizes.append((20, 20))  # row 1: the 90x40 image and a 20x20 one, one tile each
        tiles = [tiles[0], 1, 1]
        tokens = [count(sizes[0], 1), count(sizes[1], 2) + count(sizes[2], 2)]
        extra = {"batch_num_images": torch.tensor([1, 2])}
    T = max(tokens) + 6
    ids = torch.randint(16, 30, (2, T), generator=torch.Generator().manual_seed(0))
    for r, n in enumerate(tokens):
        ids[r, 1:1 + n] = c.image_token_id
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), image_sizes=torch.tensor(sizes),
                       pixel_values=torch.randn(sum(tiles), 3, 28, 28), **extra).logits
        logits.float().sum().backward()
    fm = flop_model(model)
    ours = fm.micro_batch(BatchShape(rows=2, seq_len=T, images=sum(tiles)))
    assert tiles[0] == 5 and ours.hardware == counter.get_total_flops()
    assert (ours.recompute > 0) == ckpt


@pytest.mark.parametrize("family", ["internvl", "idefics3", "smolvlm"])
@pytest.mark.parametrize("spec,ckpt", [("none", False), ("uniform25", False), ("full+vision", True),
                                       ("layers:3-projector", False)])
def test_tiled_families_match_torch_flop_counter(family, spec, ckpt):
    """The tower once per tile over its 16 patches (InternVL: and its class token), the pixel-shuffle projector on
    the 4 tokens of each tile (4x the tower's width). InternVL: with a trainable tower, checkpointing recomputes fc2
    too (its output is kept for the layer scale's gradient). Idefics3 and SmolVLM2 take all tiles as one
    [1, tiles, ...] row."""
    from helpers import idefics3, internvl
    tiny = internvl.model() if family == "internvl" else idefics3.model(smolvlm=family == "smolvlm")
    model = training_eagerly(tiny, spec, ckpt)
    c = model.config
    tiles = 5  # row 0: an image of 4 tiles (16 tokens); row 1: an image of 1 tile (4 tokens)
    T = 4 * tiles + 10
    ids = torch.randint(16, 30, (2, T), generator=torch.Generator().manual_seed(0))
    ids[0, 1:1 + 16], ids[1, 1:1 + 4] = c.image_token_id, c.image_token_id
    pixels = torch.randn(tiles, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values=pixels if family == "internvl" else pixels[None]).logits
        logits.float().sum().backward()
    fm = flop_model(model)
    assert (fm.image_positions, fm.image_tokens, fm.patches) == (17 if family == "internvl" else 16, 4, 16)
    ours = fm.micro_batch(BatchShape(rows=2, seq_len=T, images=tiles))
    assert ours.hardware == counter.get_total_flops()
    assert (ours.recompute > 0) == ckpt


@pytest.mark.parametrize("spec,ckpt", [("none", False), ("uniform25", False), ("full+vision", True),
                                       ("layers:3-projector", False)])
def test_gemma3_pooled_projector_matches_torch_flop_counter(spec, ckpt):
    """Gemma 3: every SigLIP layer feeds the projector, whose one matmul runs on the 4 average-pooled soft tokens
    per image, not the 16 patches; the sliding-window and bidirectional-image masks cost eager attention nothing
    less than a full causal one."""
    from helpers import gemma3
    model = training_eagerly(gemma3.model(), spec, ckpt)
    c, T = model.config, 14
    ids = torch.randint(10, 90, (2, T), generator=torch.Generator().manual_seed(0))
    for r in range(2):
        ids[r, 2], ids[r, 3:7], ids[r, 7] = c.boi_token_id, c.image_token_id, c.eoi_token_id
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 32, 32),
                       token_type_ids=(ids == c.image_token_id).long()).logits
        logits.float().sum().backward()
    fm = flop_model(model)
    projector = next(b for b in fm.blocks if b.kind == "projector")
    assert (fm.image_tokens, fm.patches, projector.macs) == (4, 16, 32 * 32)
    ours = fm.micro_batch(BatchShape(rows=2, seq_len=T, images=2))
    assert ours.hardware == counter.get_total_flops()
    assert (ours.recompute > 0) == ckpt


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
@pytest.mark.parametrize("spec,ckpt", [("none", False), ("layers:1", False), ("layers:2-projector", False),
                                       ("full+vision", True), ("layers:0,1.mlp", False), ("layers:1,3.attn", True)])
def test_routed_experts_match_torch_flop_counter(family, spec, ckpt):
    """Qwen3-VL MoE (layers 0, 1, 3 with 4 experts, 2 per token; layer 2 a dense MLP) and Qwen3.5 MoE (experts and a
    gated shared expert in every layer, Gated DeltaNet layers 0, 1, 3): the router on every token and each token's
    2 experts, whichever the router picks, run by transformers' eager experts loop (matmuls per expert on its
    tokens, which the counter sees). Checkpointing recomputes an MoE layer whole. The depthwise convolution's excess
    is taken off torch's count as in the Gated DeltaNet test."""
    from helpers import qwen
    model = qwen.model(family)
    model.set_experts_implementation("eager")
    model = training_eagerly(model, spec, ckpt)
    fm = flop_model(model)
    moe = [b.moe is not None for b in fm.blocks if b.kind == "llm"]
    assert moe == ([True, True, False, True] if family == "qwen3_vl_moe" else [True] * 4)
    grids = ((1, 4, 6), (1, 10, 12))
    T = 70
    counted = count_qwen_step(model, grids, T).get_total_flops()
    excess = conv_weight_grad_excess(fm, rows=2, seq_len=T)
    ours = fm.micro_batch(BatchShape(rows=2, seq_len=T, images=2, grids=grids))
    assert ours.hardware == counted - excess
    assert (ours.recompute > 0) == ckpt
