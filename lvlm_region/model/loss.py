"""The training loss: next-token cross-entropy over the trained positions only."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose logits the loss reads (the next label is trained).

    Passed to the model as ``logits_to_keep`` (transformers' own mechanism: a boolean [B, T] mask keeps exactly
    those positions and flattens them), so the LM head runs and logits exist only there, [N, V] instead of
    [B, T, V]: image tokens, prompts and padding (most positions of an LVLM batch) never reach the vocabulary.
    At Llama-3's 128K vocabulary, [B, T, V] in bf16 is 8.4 GB for 16 x 2048 tokens (arithmetic).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not -100. labels [B, T]; logits [B, T, V],
    or [N, V] for the positions loss_positions(labels) kept (in its row-major order).

    Only the trained positions' logits get an fp32 copy (and fp32 gradient): casting all of [B, T, V] would cost
    4 bytes per position and vocabulary entry, most of it for image and prompt positions the loss ignores.
    """
    target = labels[:, 1:]
    keep = loss_positions(labels)[:, :-1]  # [B, T-1]
    if logits.dim() == 2:  # already only the kept positions
        return F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")  # [N, V] -> scalar


def valid_tokens(labels: torch.Tensor) -> int:
    """How many positions token_loss_sum counts."""
    return int(loss_positions(labels).sum())


def router_loss(outputs, config) -> torch.Tensor | None:
    """A mixture-of-experts model's load-balancing loss times its coefficient, as the model's own loss adds it: the
    model returns ``aux_loss`` when its text config has ``output_router_logits`` (weighted by
    ``router_aux_loss_coef``); None for other models."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return None
    return config.get_text_config().router_aux_loss_coef * aux.float()
