"""FLOPs of a training step from what actually runs: which blocks are on the backward path and which train.

Matmul work only (nn.Linear, the patch-embedding convolution, attention's two products), counted as
2 x multiply-accumulates, on the padded batch the hardware executes; norms, activations, softmax, rotary and
the loss are left out (a few percent at most). This is what ``torch.utils.flop_counter`` counts too, and
the tests compare the two on tiny models.

Per block (the vision patch embedding, each vision encoder layer, the projector, each LLM decoder layer,
the LM head), bottom to top:
- forward: every block, always;
- activation gradient (same matmuls again, attention twice): only blocks on the backward path, i.e. with a
  trainable parameter at or below them; a linear that reads the block's input is skipped when nothing below
  needs a gradient (the projector's first linear when the vision tower is frozen, the patch convolution);
- weight gradient: only the trainable weights' matmuls (LoRA adapters count as their own small matmuls);
- recomputation: the forward again for checkpointed blocks on the backward path, except the block's last
  linear: torch's non-reentrant checkpoint stops recomputing once every saved tensor is back, and nothing
  saves the output of the last projection (down_proj / fc2), only its input.
"Model FLOPs" (for MFU) are forward + activation + weight gradients; "hardware FLOPs" add recomputation.
For a 32-layer LLM tuning 8 layers with the projector, the decoder part is (32 + 32 + 8) / 96 = 0.75 of
full tuning, (32 + 64 + 8) / 128 = 0.81 with checkpointing; 6N per token would overstate it by a third.
Known gap: inside a decoder layer the model does not follow requires_grad op by op. When the layer's input
needs no gradient and its own norms are frozen (LoRA or a ``.attn`` / ``.mlp`` region on the lowest layer of the
path, projector frozen), torch
skips the activation gradient of the q/k/v projections, which the model still counts (about a fifth of that
layer's activation-gradient matmuls). Whole-layer regions, and LoRA or sub-layers with the projector trained (the
paper's recipe), are exact.
Attention is counted as the full T x T products (as the eager and math paths run it; flash-attention skips
about half of a causal mask).
The LM head runs on the trained positions only (BatchShape.head_tokens; the trainer passes logits_to_keep).
Gated DeltaNet layers (Qwen3.5's linear attention; ``DeltaRule``): the depthwise causal convolution and the matmuls
of transformers' chunked torch path (``torch_chunk_gated_delta_rule``, chunks of 64 positions, the padded length
rounded up to whole chunks); its two triangular solves per chunk are left out (as torch's counter leaves them out;
about 1% of such a layer at Qwen3.5's sizes), their backward's matmuls are counted.
Mixture-of-experts MLPs (Qwen3-VL MoE, Qwen3.5 MoE; ``RoutedExperts``): the router on every token and each token's
``top_k`` experts (gate, up and down projections), whatever the experts' implementation; a shared expert is plain
linears. A checkpointed MoE layer is recomputed whole (the routing weights' gradient saves the experts' outputs).
Qwen2-VL / Qwen2.5-VL: the vision tower's sequence is each image's own patches (t x h x w from image_grid_thw, so
the batch carries the grids), attention stays within an image (within each 112 px window in Qwen2.5-VL's windowed
layers), and the merger (the projector) runs on the patches merged 2 x 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from .regions import Region


@dataclass(frozen=True)
class Block:
    name: str
    kind: str  # "vision_embed" | "vision" | "projector" | "embed" | "llm" | "lm_head"
    macs: int  # multiply-accumulates per token of all its weight matmuls
    trainable_macs: int  # of those, the ones whose weight trains
    input_macs: int = 0  # of those, the ones that read the block's input directly (see module docstring)
    heads: int = 0  # self-attention heads over the block's sequence (0: none)
    head_dim: int = 0
    trainable: bool = False  # any parameter of the block trains
    checkpointed: bool = False
    tail_macs: int = 0  # the block's last linear (down_proj, fc2): not recomputed (see recompute below)
    used: bool = True  # False: computed but not read downstream (vision layers above the feature layer): no backward
    windowed: bool = False  # Qwen2.5-VL: attention within windows of the image, not the whole image
    delta: "DeltaRule | None" = None  # a Gated DeltaNet token mixer instead of self-attention (heads = 0)
    moe: "RoutedExperts | None" = None  # a mixture-of-experts MLP's router and routed experts


@dataclass(frozen=True)
class RoutedExperts:
    """A sparse MoE MLP's routed part (``mlp.gate`` and ``mlp.experts``): a router (hidden x experts) on every token,
    and each token through ``top_k`` of the ``experts`` experts (gate and up: hidden x 2 inter; down: inter x hidden).
    The experts are 3-D parameters, not nn.Linear, so linear_macs does not see them. Per token the work is the same
    whichever experts the router picks; the backward takes each matmul once for the inputs (the router's too: the
    routing weights scale the experts' outputs) and once for the weights when they train."""

    experts: int
    top_k: int
    hidden: int
    inter: int
    trainable: bool = False

    def macs(self, tokens: int) -> tuple[int, int, int]:
        """(forward, activation-gradient, weight-gradient) multiply-accumulates over ``tokens`` tokens."""
        work = tokens * (self.hidden * self.experts + self.top_k * 3 * self.hidden * self.inter)
        return work, work, work if self.trainable else 0


@dataclass(frozen=True)
class DeltaRule:
    """A Gated DeltaNet layer's token mixer (Qwen3.5's ``linear_attn``) as transformers' torch path runs it: a
    depthwise causal convolution (``channels`` x ``kernel``) over q, k and v, then ``torch_chunk_gated_delta_rule``
    with ``heads`` value heads (query and key heads repeated to match), key / value head sizes ``k_dim`` / ``v_dim``.

    Per row and head, with the length padded to N chunks of C: per chunk the forward has k_beta k^T and q k^T
    (C x C x k_dim each), a read of the carried state by the decayed keys and by the queries (C x k_dim x v_dim each),
    the within-chunk product with the new values (C x C x v_dim) and the state update k^T v (k_dim x C x v_dim). The
    backward takes each product twice (one per operand), except that chunk 0 reads the zero initial state (no
    gradient for it) and the last chunk's state update feeds nothing; each triangular solve's backward adds one
    matmul (C x C x v_dim for the values, C x C x k_dim for the decayed keys)."""

    heads: int
    k_dim: int
    v_dim: int
    channels: int  # the convolution's channels (2 x key dim + value dim)
    kernel: int
    chunk: int = 64
    conv_trainable: bool = False

    def macs(self, rows: int, seq_len: int) -> tuple[int, int, int]:
        """(forward, activation-gradient, weight-gradient) multiply-accumulates of ``rows`` rows of ``seq_len``."""
        C, dk, dv = self.chunk, self.k_dim, self.v_dim
        n = -(-seq_len // C)
        conv = rows * (seq_len + self.kernel - 1) * self.channels * self.kernel  # padded both sides, then cut
        fwd = rows * self.heads * n * (2 * C * C * dk + C * C * dv + 3 * C * dk * dv)
        bwd = rows * self.heads * (n * (5 * C * C * dk + 3 * C * C * dv + 6 * C * dk * dv) - 4 * C * dk * dv)
        return fwd + conv, bwd + conv, conv if self.conv_trainable else 0


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch as executed: rows x padded length, and the images it carries (the dummy one included)."""

    rows: int
    seq_len: int
    images: int
    grids: tuple = ()  # Qwen2-VL: each image's patch grid (t, h, w), from image_grid_thw
    head_tokens: int | None = None  # positions the LM head runs on (the trained ones); None: every position


@dataclass(frozen=True)
class GridVision:
    """A vision tower whose sequence is each image's own patch grid (Qwen2-VL / Qwen2.5-VL)."""

    merge: int  # patches merged per side into one LLM token
    window: int = 0  # Qwen2.5-VL: window side in merged units (0: no windowed layers)


@dataclass
class Flops:
    forward: float = 0.0
    act_grad: float = 0.0
    weight_grad: float = 0.0
    recompute: float = 0.0

    @property
    def model(self) -> float:
        return self.forward + self.act_grad + self.weight_grad

    @property
    def hardware(self) -> float:
        return self.model + self.recompute

    def __iadd__(self, other: "Flops") -> "Flops":
        for k in ("forward", "act_grad", "weight_grad", "recompute"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def to_dict(self) -> dict:
        return {"forward": self.forward, "act_grad": self.act_grad, "weight_grad": self.weight_grad,
                "recompute": self.recompute, "model": self.model, "hardware": self.hardware}


def linear_macs(module: nn.Module, trainable_only: bool = False) -> int:
    """Per-token MACs of the nn.Linear modules inside (shapes from the module attributes, so ZeRO-3 safe)."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and (not trainable_only or m.weight.requires_grad):
            total += m.in_features * m.out_features
    return total


def last_linear_macs(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    return last.in_features * last.out_features


def any_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def is_checkpointed(module: nn.Module) -> bool:
    return bool(getattr(module, "gradient_checkpointing", False))


@dataclass
class FlopModel:
    blocks: list[Block]
    image_positions: int  # vision sequence length per image (patches, + a class token for CLIP)
    image_tokens: int  # tokens per image after the projector (what the LLM sees)
    patches: int  # patch-embedding outputs per image
    vision_checkpointed: bool = False
    meta: dict = field(default_factory=dict)
    grid: GridVision | None = None  # set for Qwen2-VL-style towers: sizes come from BatchShape.grids

    def for_region(self, region: Region, checkpointing: bool | None = None) -> "FlopModel":
        """The same shapes with the trainable set a region gives (whole blocks), e.g. `full` for the baseline. A
        sub-layer region (``.attn`` / ``.mlp``) is refused: blocks here are whole layers; apply the region to the
        model and build its FLOP model (families.flop_model reads requires_grad)."""
        if region.sublayer:
            raise ValueError(f"for_region counts whole layers; {region.spec!r} trains a sub-layer: apply it to the "
                             "model and use families.flop_model")
        parts = region.parts
        out = []
        for b in self.blocks:
            if b.kind in ("vision", "vision_embed"):
                on = weights = parts.get("vision", False)
            elif b.kind in ("projector", "embed"):
                on = weights = parts.get(b.kind, False)
            elif b.kind == "llm":
                on = weights = int(b.name.split(".")[1]) in region.layers
            else:  # lm_head: on the path when the final norm trains too, but then its weight has no gradient
                weights = parts.get("lm_head", False)
                on = weights or parts.get("norm", False)
            ck = checkpointing if checkpointing is not None and b.kind == "llm" else b.checkpointed
            delta = replace(b.delta, conv_trainable=weights) if b.delta else None
            moe = replace(b.moe, trainable=weights) if b.moe else None
            out.append(replace(b, trainable=on, trainable_macs=b.macs if weights else 0, checkpointed=ck,
                               delta=delta, moe=moe))
        return replace(self, blocks=out)

    def step(self, batches: list[BatchShape]) -> Flops:
        """FLOPs of the micro-batches of one step on one rank."""
        total = Flops()
        for b in batches:
            total += self.micro_batch(b)
        return total

    def extent(self, b: Block, shape: BatchShape) -> tuple[int, int]:
        """(tokens, sum over its attention sequences of length²) that block ``b`` runs over in ``shape``."""
        if b.kind == "lm_head" and shape.head_tokens is not None:
            return shape.head_tokens, 0
        if b.kind not in ("vision_embed", "vision", "projector"):
            return shape.rows * shape.seq_len, shape.rows * shape.seq_len ** 2
        if self.grid is None:
            seq = {"vision_embed": self.patches, "vision": self.image_positions, "projector": self.image_tokens}[b.kind]
            return shape.images * seq, shape.images * seq ** 2
        m, win = self.grid.merge, self.grid.window
        patches = sum(t * h * w for t, h, w in shape.grids)
        if b.kind == "projector":
            return patches // m ** 2, 0
        if b.windowed:  # windows of win x win merged units per frame (smaller at the right and bottom edges)
            sq = sum(t * m ** 4 * _windows_sq(h // m, win) * _windows_sq(w // m, win) for t, h, w in shape.grids)
        else:  # each frame of each image attends within itself
            sq = sum(t * (h * w) ** 2 for t, h, w in shape.grids)
        return patches, sq

    def micro_batch(self, shape: BatchShape) -> Flops:
        f = Flops()
        below_vision = below_llm = False  # whether some parameter below needs a gradient
        for b in self.blocks:
            tokens, sq = self.extent(b, shape)
            linear = 2.0 * tokens * b.macs
            attn = 4.0 * b.heads * sq * b.head_dim
            mixer = b.delta.macs(shape.rows, shape.seq_len) if b.delta else (0, 0, 0)
            routed = b.moe.macs(tokens) if b.moe else (0, 0, 0)
            mix_fwd, mix_bwd, mix_w = (2.0 * (m + r) for m, r in zip(mixer, routed))
            fwd = linear + attn + mix_fwd
            # The projector reads the vision tower; everything above it reads the projector and the embeddings.
            input_grad = below_vision if b.kind in ("vision_embed", "vision", "projector") else below_llm
            on_path = input_grad or b.trainable
            if b.kind in ("vision_embed", "vision"):
                below_vision = on_path
            else:
                below_llm = below_llm or on_path
            f.forward += fwd
            if on_path and b.used:
                skipped = 0 if input_grad else 2.0 * tokens * b.input_macs
                f.act_grad += linear - skipped + 2 * attn + mix_bwd
                f.weight_grad += 2.0 * tokens * b.trainable_macs + mix_w
                if b.checkpointed:
                    f.recompute += fwd - 2.0 * tokens * b.tail_macs
        return f


def projector_block(parts) -> Block:
    """The projector; its first linear reads the vision features, unless a trained norm comes before it (Qwen2-VL's
    merger: ln_q), whose weights need that linear's input gradient."""
    modules = list(parts.projector.modules())
    k = next(i for i, m in enumerate(modules) if isinstance(m, nn.Linear))
    first = modules[k]
    before = any(p.requires_grad for m in modules[1:k] for p in m.parameters(recurse=False))
    return Block("projector", "projector", linear_macs(parts.projector), linear_macs(parts.projector, True),
                 input_macs=0 if before else first.in_features * first.out_features,
                 trainable=any_trainable(parts.projector))


def llm_blocks(model, parts, mlp_output_norm: bool = False) -> list[Block]:
    """The input embeddings, the decoder layers and the LM head. ``mlp_output_norm``: a norm reads the MLP's output
    before the residual add (Gemma 2 / 3's post_feedforward_layernorm), so checkpointing recomputes the last
    linear too (the norm saves its input)."""
    tcfg = model.config.get_text_config()
    heads = tcfg.num_attention_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads
    decoder = model.get_decoder()
    blocks = [Block("embed", "embed", 0, 0, trainable=any_trainable(parts.embed))]
    for i, layer in enumerate(parts.layers):
        delta, moe = delta_rule(layer), routed_experts(layer)
        blocks.append(Block(f"layer.{i}", "llm", linear_macs(layer), linear_macs(layer, True),
                            heads=0 if delta else heads, head_dim=0 if delta else head_dim,
                            trainable=any_trainable(layer), checkpointed=is_checkpointed(decoder) and decoder.training,
                            tail_macs=0 if mlp_output_norm or moe else last_linear_macs(layer), delta=delta,
                            moe=moe))
    head = parts.lm_head
    blocks.append(Block("lm_head", "lm_head", head.in_features * head.out_features,
                        head.in_features * head.out_features if head.weight.requires_grad else 0,
                        trainable=any_trainable(head) or any_trainable(parts.norm)))
    return blocks


def delta_rule(layer: nn.Module) -> DeltaRule | None:
    """The layer's Gated DeltaNet mixer (``linear_attn``: Qwen3.5's linear-attention layers), or None."""
    mixer = getattr(layer, "linear_attn", None)
    if mixer is None:
        return None
    conv = mixer.conv1d
    return DeltaRule(heads=mixer.num_v_heads, k_dim=mixer.head_k_dim, v_dim=mixer.head_v_dim,
                     channels=conv.out_channels, kernel=conv.kernel_size[0], conv_trainable=conv.weight.requires_grad)


def routed_experts(layer: nn.Module) -> RoutedExperts | None:
    """The layer's mixture-of-experts router and experts (``mlp.gate``, ``mlp.experts`` with 3-D weights), or None.
    Sizes from the modules' attributes (ZeRO-3 partitions the parameters)."""
    mlp = getattr(layer, "mlp", None)
    experts, router = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
    if experts is None or not hasattr(experts, "gate_up_proj") or not hasattr(router, "top_k"):
        return None
    return RoutedExperts(experts=experts.num_experts, top_k=router.top_k, hidden=experts.hidden_dim,
                         inter=experts.intermediate_dim, trainable=experts.gate_up_proj.requires_grad)


@dataclass
class VisionFlops:
    """A family's vision side (families/): its blocks bottom to top (patch embedding, encoder layers, projector)
    and the per-image sizes FlopModel reads (``grid`` instead for towers whose sequence is each image's grid)."""

    blocks: list[Block]
    image_positions: int = 0
    image_tokens: int = 0
    patches: int = 0
    grid: GridVision | None = None
    mlp_output_norm: bool = False  # the LLM's layers normalise the MLP output (see llm_blocks)

    def with_llm(self, model, parts) -> FlopModel:
        """The whole model's FlopModel: this vision side, then the LLM's blocks."""
        return FlopModel(self.blocks + llm_blocks(model, parts, self.mlp_output_norm),
                         image_positions=self.image_positions,
                         image_tokens=self.image_tokens, patches=self.patches, grid=self.grid)


def _windows_sq(n: int, win: int) -> int:
    """Sum of squared window lengths when n units are cut into windows of ``win`` (the last one shorter)."""
    return (n // win) * win ** 2 + (n % win) ** 2
