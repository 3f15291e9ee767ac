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
needs no gradient and its own norms are frozen (LoRA on the lowest layer of the path, projector frozen), torch
skips the activation gradient of the q/k/v projections, which the model still counts (about a fifth of that
layer's activation-gradient matmuls). Whole-layer regions, and LoRA with the projector trained (the paper's
recipe), are exact.
Attention is counted as the full T x T products (as the eager and math paths run it; flash-attention skips
about half of a causal mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from .model import find_parts, image_seq_length
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


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch as executed: rows x padded length, and the images it carries (the dummy one included)."""

    rows: int
    seq_len: int
    images: int


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


def _macs(module: nn.Module, trainable_only: bool = False) -> int:
    """Per-token MACs of the nn.Linear modules inside (shapes from the module attributes, so ZeRO-3 safe)."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and (not trainable_only or m.weight.requires_grad):
            total += m.in_features * m.out_features
    return total


def _tail_macs(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    return last.in_features * last.out_features


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _checkpointed(module: nn.Module) -> bool:
    return bool(getattr(module, "gradient_checkpointing", False))


@dataclass
class FlopModel:
    blocks: list[Block]
    image_positions: int  # vision sequence length per image (patches, + a class token for CLIP)
    image_tokens: int  # tokens per image after the projector (what the LLM sees)
    patches: int  # patch-embedding outputs per image
    vision_checkpointed: bool = False
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model) -> "FlopModel":
        """Read block shapes and the current requires_grad / checkpointing of a Llava-style model."""
        parts = find_parts(model)
        vcfg, tcfg = model.config.vision_config, model.config.get_text_config()
        embeddings = next(m for m in parts.vision.modules() if hasattr(m, "num_positions"))
        conv = next(m for m in parts.vision.modules() if isinstance(m, nn.Conv2d))
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        conv_macs = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        encoder = next(m for m in parts.vision.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList))
        v_heads = vcfg.num_attention_heads
        t_heads = tcfg.num_attention_heads
        t_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // t_heads
        blocks = [Block("vision.embed", "vision_embed", conv_macs, conv_macs if conv.weight.requires_grad else 0,
                        input_macs=conv_macs, trainable=_trainable(embeddings))]
        # LLaVA reads hidden_states[vision_feature_layer] (-2: the output of the second-to-last layer); the
        # layers above it still run forward but nothing flows back through them.
        n_used = max(k if k >= 0 else len(encoder.layers) + 1 + k for k in _as_list(model.config.vision_feature_layer))
        for i, layer in enumerate(encoder.layers):
            blocks.append(Block(f"vision.{i}", "vision", _macs(layer), _macs(layer, True), heads=v_heads,
                                head_dim=vcfg.hidden_size // v_heads, trainable=_trainable(layer),
                                checkpointed=_checkpointed(encoder) and encoder.training, used=i < n_used,
                                tail_macs=_tail_macs(layer)))
        first = next(m for m in parts.projector.modules() if isinstance(m, nn.Linear))
        blocks.append(Block("projector", "projector", _macs(parts.projector), _macs(parts.projector, True),
                            input_macs=first.in_features * first.out_features,
                            trainable=_trainable(parts.projector)))
        blocks.append(Block("embed", "embed", 0, 0, trainable=_trainable(parts.embed)))
        decoder = model.get_decoder()
        for i, layer in enumerate(parts.layers):
            blocks.append(Block(f"layer.{i}", "llm", _macs(layer), _macs(layer, True), heads=t_heads, head_dim=t_dim,
                                trainable=_trainable(layer),
                                checkpointed=_checkpointed(decoder) and decoder.training,
                                tail_macs=_tail_macs(layer)))
        head = parts.lm_head
        blocks.append(Block("lm_head", "lm_head", head.in_features * head.out_features,
                            head.in_features * head.out_features if head.weight.requires_grad else 0,
                            trainable=_trainable(head) or _trainable(parts.norm)))
        return cls(blocks, image_positions=embeddings.num_positions, image_tokens=image_seq_length(model.config),
                   patches=patches)

    def for_region(self, region: Region, checkpointing: bool | None = None) -> "FlopModel":
        """The same shapes with the trainable set a region gives (whole blocks), e.g. `full` for the baseline."""
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
            out.append(replace(b, trainable=on, trainable_macs=b.macs if weights else 0, checkpointed=ck))
        return replace(self, blocks=out)

    def step(self, batches: list[BatchShape]) -> Flops:
        """FLOPs of the micro-batches of one step on one rank."""
        total = Flops()
        for b in batches:
            total += self.micro_batch(b)
        return total

    def micro_batch(self, shape: BatchShape) -> Flops:
        f = Flops()
        below_vision = below_llm = False  # whether some parameter below needs a gradient
        for b in self.blocks:
            if b.kind == "vision_embed":
                seqs, seq = shape.images, self.patches
            elif b.kind == "vision":
                seqs, seq = shape.images, self.image_positions
            elif b.kind == "projector":
                seqs, seq = shape.images, self.image_tokens
            else:
                seqs, seq = shape.rows, shape.seq_len
            tokens = seqs * seq
            linear = 2.0 * tokens * b.macs
            attn = 4.0 * seqs * b.heads * seq * seq * b.head_dim
            fwd = linear + attn
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
                f.act_grad += linear - skipped + 2 * attn
                f.weight_grad += 2.0 * tokens * b.trainable_macs
                if b.checkpointed:
                    f.recompute += fwd - 2.0 * tokens * b.tail_macs
        return f


def _as_list(x) -> list[int]:
    return list(x) if isinstance(x, (list, tuple)) else [x]
