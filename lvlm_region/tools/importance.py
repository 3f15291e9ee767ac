"""Layer importance of a model's LLM: block influence from hidden states, or relative weight change against a base.

``bi`` (block influence, the paper's score): BI_i = 1 - mean over tokens of cos(h_in_i, h_out_i), with h_in_i and
h_out_i the hidden states entering and leaving decoder layer i, read by forward hooks on the decoder layers (found
as module objects) in the model's precision and accumulated in fp64. A layer that changes its input little scores
near 0. Runs on 1..N ranks: each rank takes every N-th sample, the per-layer sums are all-reduced; under ZeRO-3 the
weights stay partitioned and a rank with one sample fewer runs a masked repeat so every rank makes the same calls.

``delta``: ||W_i - W_base_i|| / ||W_base_i|| over all parameters of decoder layer i, between a fine-tuned model and
its base: where tuning actually moved the LLM (the paper's way of locating the visual region).

``snr``: the signal-to-noise of each weight matrix of decoder layer i from its singular values, as Spectrum scores
text models, no data needed: the noise scale sigma = IQR(singular values) / 1.349, the Marchenko-Pastur bulk edge
sigma (1 + sqrt(min(n, m) / max(n, m))), SNR = (sum of the singular values above it) / (sum of those at or below),
divided by the largest singular value; a matrix with none at or below counts its smallest as the noise. A layer's
score is the mean over its matrices: every nn.Linear weight, and each expert's matrices of an MoE layer's 3-D expert
weights. Read on rank 0 from the checkpoint's weights (fp64 SVDs).

``grad``: the norm of the gradient of the training loss (the mean over the samples' trained tokens, as the trainer
computes it) with respect to all of decoder layer i's weights, over ``--samples`` of the data: every decoder layer
and the projector made trainable, one real DeepSpeed engine (ZeRO-2 or 3, 1..N ranks) accumulating every sample's
gradient, read whole on every rank (engine.full_grad) before any optimizer step; nothing is written to the model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..data.batches import ImageTextDataset, run_loader, to_device
from ..infra import outputs
from ..model.families import find_parts
from ..model.load import load_model, skeleton
from ..train import engine
from ..train.run_setup import obtain_data, setup
from .evaluate import trained_with

log = logging.getLogger(__name__)

METHODS = ("bi", "delta", "snr", "grad")
TOKENS = ("all", "text", "image")


class BlockInfluence:
    """Forward hooks on ``layers`` that add up, per layer, cos(h_in, h_out) over the tokens ``mask`` selects (fp64),
    and the number of those tokens. Set ``mask`` ([batch, seq] bool) before each forward; None counts nothing."""

    def __init__(self, layers):
        self.sums = torch.zeros(len(layers), dtype=torch.float64)
        self.counts = torch.zeros(len(layers), dtype=torch.float64)
        self.mask: torch.Tensor | None = None
        self._handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            if self.mask is None:
                return
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)  # [batch, seq]
            if self.sums.device != cos.device:  # summed where the model runs: no device sync per layer and batch
                self.sums, self.counts = self.sums.to(cos.device), self.counts.to(cos.device)
            self.sums[i] += cos[self.mask].sum()
            self.counts[i] += self.mask.sum()
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def bi_scores(sums: list[float], counts: list[float]) -> list[float]:
    return [1.0 - s / c if c else float("nan") for s, c in zip(sums, counts)]


def token_mask(batch: dict, tokens: str, image_token_id: int | None) -> torch.Tensor:
    """The positions whose hidden states count: real (attention mask) tokens, all / text only / image only."""
    mask = batch["attention_mask"].bool()
    if tokens == "all":
        return mask
    image = batch["input_ids"] == image_token_id if image_token_id is not None else torch.zeros_like(mask)
    return mask & image if tokens == "image" else mask & ~image


def sample_indices(n: int, samples: int | None, seed: int) -> list[int]:
    """Which of the data's ``n`` samples are scored: all, or ``samples`` of them drawn with ``seed`` (in order)."""
    if not samples or samples >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), samples))


def check_layers(model_dir: str) -> int:
    """The LLM's depth, found from the config alone (a meta-device skeleton): refuses, before any weights load, a
    model whose decoder layers cannot be found."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"--model {model_dir}: no config.json there; give a local transformers checkpoint")
    try:
        return len(find_parts(skeleton(AutoConfig.from_pretrained(model_dir))).layers)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--model {model_dir}: cannot find its LLM's decoder layers, so they cannot be scored ({e})"
                         ) from None


@dataclass
class ScoringRun:
    """What bi and grad share: the setup, the samples scored (``chosen``, drawn with cfg.seed), this rank's share of
    them (``micro_steps`` micro-batches; padded with repeats of the first so that every rank makes the same calls,
    which ZeRO-3's gathers need), and the model (loaded into ZeRO-3's partitions when the config says so)."""

    s: object  # run_setup.Setup
    chosen: list[int]
    loader: object  # this rank's share, in order
    real: int  # how many of this rank's share are real samples (the rest are masked repeats)
    micro_steps: int
    dtype: torch.dtype
    model: torch.nn.Module

    @classmethod
    def start(cls, cfg: RunConfig, samples: int | None) -> "ScoringRun":
        s = setup(cfg, trains=False)
        ds, folder = obtain_data(cfg.data, cfg.image_folder, "importance", s)
        chosen = sample_indices(len(ds), samples, cfg.seed)
        if not chosen:
            raise ValueError(f"--data {cfg.data} has no samples left after preparation: nothing to score")
        rank, world = engine.rank(), engine.world_size()
        mine = chosen[rank::world]
        real = len(mine)
        mine += [chosen[0]] * (math.ceil(len(chosen) / world) - real)
        dtype = engine.torch_dtype(s.precision)
        loading = engine.PartitionedLoading(s.ds_config)
        model = load_model(cfg.model_path, dtype, s.attn)
        loading.close()
        layout = s.encoding.layout
        loader = run_loader(ImageTextDataset(ds.select(mine), folder, s.load_image, layout), cfg,
                            s.tokenizer.pad_token_id, layout.dummy(), 0, 1, shuffle=False, drop_last=False)
        return cls(s, chosen, loader, real, math.ceil(len(mine) / cfg.micro_batch), dtype, model)

    def batches(self):
        """(batch on the device, [rows] bool: which rows are real samples) over this rank's share."""
        position = 0
        for b in self.loader:
            b = to_device(b, engine.device(), self.dtype)
            rows = b["input_ids"].shape[0]
            yield b, torch.arange(position, position + rows, device=b["input_ids"].device) < self.real
            position += rows


@torch.no_grad()
def block_influence(cfg: RunConfig, samples: int | None, tokens: str) -> dict:
    """BI of every decoder layer of ``cfg.model`` on ``cfg.data`` (``samples`` of it, drawn with cfg.seed)."""
    run = ScoringRun.start(cfg, samples)
    s, chosen, world = run.s, run.chosen, engine.world_size()
    runner = engine.inference_model(run.model, s.ds_config)
    hooks = BlockInfluence(find_parts(run.model).layers)
    layout = s.encoding.layout
    try:
        for b, keep in run.batches():
            hooks.mask = token_mask(b, tokens, layout.image_token_id) & keep[:, None]
            runner(**layout.model_inputs(b), logits_to_keep=1)
    finally:
        hooks.close()
    n_layers = len(hooks.sums)
    totals = engine.all_reduce_sum(hooks.sums.tolist() + hooks.counts.tolist())
    sums, counts = totals[:n_layers], totals[n_layers:]
    if not counts[0]:
        raise ValueError(f"no {tokens} tokens in the {len(chosen)} samples scored; use --tokens all or data with "
                         f"{tokens} tokens")
    return {"scores": bi_scores(sums, counts), "samples": len(chosen), "tokens": tokens, "token_count": int(counts[0]),
            "data": os.path.abspath(cfg.data), "precision": s.precision, "zero_stage": engine.zero_stage(s.ds_config),
            "world_size": world}


def gradient_norms(cfg: RunConfig, samples: int | None) -> dict:
    """Per decoder layer, ||d loss / d W_i|| of the mean token loss over ``samples`` of ``cfg.data`` (see above)."""
    from ..model.loss import loss_positions, token_loss_sum, valid_tokens
    from ..model.regions import resolve
    from ..model.trainable import apply_region

    run = ScoringRun.start(cfg, samples)
    s, chosen, model, micro_steps, world = run.s, run.chosen, run.model, run.micro_steps, engine.world_size()
    parts = find_parts(model)
    apply_region(model, resolve("full", len(parts.layers), tied=parts.tied))  # every layer's weights get a gradient
    # one accumulation over every sample of this rank's share: no optimizer step
    ds_config = engine.build_ds_config(engine.zero_stage(s.ds_config), cfg.ds_config, cfg.micro_batch, micro_steps,
                                       0.0, s.precision)
    eng, _ = engine.initialize(model, ds_config, lr=1e-3, weight_decay=0.0, total_steps=1, warmup_steps=0)
    layout = s.encoding.layout
    tokens = 0
    for step, (b, keep) in enumerate(run.batches()):
        engine.last_micro_step(eng, step == micro_steps - 1)
        labels = b["labels"].masked_fill(~keep[:, None], -100)
        logits = eng(**layout.model_inputs(b), logits_to_keep=loss_positions(labels)).logits
        eng.backward(token_loss_sum(logits, labels))
        tokens += valid_tokens(labels)
    total = engine.all_reduce_sum([float(tokens)])[0]
    if not total:
        raise ValueError(f"no trained tokens in the {len(chosen)} samples scored: nothing to take a gradient of")
    # DeepSpeed averaged the summed losses' gradients over micro-steps and ranks: back to the mean token loss's
    scale = micro_steps * world / total
    scores = [math.sqrt(sum(float(engine.full_grad(p).double().pow(2).sum()) for p in layer.parameters())) * scale
              for layer in parts.layers]
    engine.release(eng)
    return {"scores": scores, "samples": len(chosen), "token_count": int(total), "data": os.path.abspath(cfg.data),
            "precision": s.precision, "zero_stage": engine.zero_stage(ds_config), "world_size": world}


@torch.no_grad()
def weight_delta(model_dir: str, base_dir: str) -> dict:
    """||W_i - W_base_i|| / ||W_base_i|| per decoder layer i (all its parameters together), in fp64."""
    tuned, base = load_model(model_dir, torch.float32), load_model(base_dir, torch.float32)
    layers, base_layers = find_parts(tuned).layers, find_parts(base).layers
    if len(layers) != len(base_layers):
        raise ValueError(f"--base {base_dir} has {len(base_layers)} decoder layers, --model {model_dir} "
                         f"{len(layers)}: compare a model with the base it was tuned from")
    scores = []
    for i, (layer, ref) in enumerate(zip(layers, base_layers)):
        a, b = dict(layer.named_parameters()), dict(ref.named_parameters())
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise ValueError(f"decoder layer {i} of --model {model_dir} and --base {base_dir} differ in parameters "
                             "or shapes: compare a model with the base it was tuned from")
        diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
        norm = sum(float(b[k].double().pow(2).sum()) for k in a)
        scores.append(math.sqrt(diff) / math.sqrt(norm) if norm else float("nan"))
    return {"scores": scores, "base": os.path.abspath(base_dir)}


def matrix_snr(w: torch.Tensor) -> float:
    """Spectrum's SNR of one weight matrix over its largest singular value (see the module docstring)."""
    s = torch.linalg.svdvals(w.double())
    sigma = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = w.shape
    edge = sigma * (1 + math.sqrt(min(n, m) / max(n, m)))
    signal, noise = float(s[s > edge].sum()), float(s[s <= edge].sum())
    if noise == 0:
        noise = float(s[-1])
    return signal / noise / float(s[0]) if noise > 0 and s[0] > 0 else 0.0


def layer_matrices(layer: torch.nn.Module) -> list[torch.Tensor]:
    """A decoder layer's weight matrices: each nn.Linear's, and each expert's of a 3-D experts weight (a module
    with ``num_experts`` holding [experts, a, b] parameters)."""
    out = []
    for module in layer.modules():
        if isinstance(module, torch.nn.Linear):
            out.append(module.weight)
        elif hasattr(module, "num_experts"):
            out += [w for p in module.parameters(recurse=False) if p.ndim == 3 for w in p]
    return out


@torch.no_grad()
def weight_snr(model_dir: str) -> dict:
    """Per decoder layer, the mean SNR of its weight matrices (matrix_snr)."""
    layers = find_parts(load_model(model_dir, torch.float32)).layers
    scores, matrices = [], []
    for layer in layers:
        values = [matrix_snr(w) for w in layer_matrices(layer)]
        scores.append(sum(values) / len(values))
        matrices.append(len(values))
    return {"scores": scores, "matrices": matrices}


def score(cfg: RunConfig, method: str, output: str, samples: int | None = None, tokens: str = "all",
          base: str | None = None) -> dict:
    """Score ``cfg.model``'s decoder layers; rank 0 writes ``output`` (scores.json) and scores.png beside it."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if tokens not in TOKENS:
        raise ValueError(f"--tokens {tokens!r}: choose one of {', '.join(TOKENS)}")
    if method == "delta" and not base:
        raise ValueError("--method delta needs --base BASE_DIR: the model the scored one was tuned from")
    check_output(output)
    depth = check_layers(cfg.model_path)
    if base:
        check_layers(base)
    start = time.perf_counter()
    if method == "bi":
        result = block_influence(cfg, samples, tokens)
    elif method == "grad":
        result = gradient_norms(cfg, samples)
    else:
        engine.init_distributed(cfg.dist_timeout)
        read = (lambda: weight_delta(cfg.model_path, base)) if method == "delta" else (
            lambda: weight_snr(cfg.model_path))
        result = read() if engine.rank() == 0 else {"scores": []}
    run = trained_with(cfg.model_path)
    region = (run or {}).get("region")
    out = {"method": method, "model": os.path.abspath(cfg.model_path), "layers": depth, **result,
           "seed": cfg.seed, "region": region, "seconds": time.perf_counter() - start}
    if engine.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        outputs.write_json_atomic(output, out)
        plot(out, os.path.splitext(output)[0] + ".png")
        log.info("%s scores of %d layers -> %s", method, depth, output)
    engine.barrier()
    return out


def is_scores_file(path: str) -> bool:
    """Whether ``path`` is a scores file this program wrote (a JSON object with its method, layers and scores)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"method", "layers", "scores", "model"} <= set(data)


def check_output(output: str) -> None:
    """Refuse, before any work, an --output this program would write over without having written it: a directory,
    an existing file that is not one of its scores files (the data, a config.json), or a chart path (.png beside it)
    that exists without such a scores file."""
    chart = os.path.splitext(output)[0] + ".png"
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a directory; give the scores file's path, e.g. "
                         f"{os.path.join(output, 'scores.json')}")
    if not output.endswith(".json"):
        raise ValueError(f"--output {output}: the scores file is JSON; give a path ending in .json (the chart goes "
                         "beside it as .png)")
    ours = is_scores_file(output)
    if os.path.lexists(output) and not ours:
        raise ValueError(f"--output {output} exists and is not a scores file this program wrote; it would be "
                         "replaced. Give a new path (nothing was written)")
    if os.path.lexists(chart) and not ours:
        raise ValueError(f"--output {output}: its chart {chart} exists and belongs to no scores file this program "
                         "wrote; it would be replaced. Give another --output (nothing was written)")


def plot(out: dict, path: str) -> None:
    """A bar per layer; the layers of the region the model was trained with (its run.json) in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = set((out.get("region") or {}).get("layers") or [])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * out["layers"]), 3.0))
    colours = ["tab:orange" if i in trained else "tab:blue" for i in range(out["layers"])]
    ax.bar(range(out["layers"]), out["scores"], color=colours)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel({"bi": "block influence", "delta": "relative weight change",
                   "snr": "weight SNR (Marchenko-Pastur)", "grad": "loss gradient norm"}[out["method"]])
    title = os.path.basename(out["model"].rstrip("/"))
    if trained:
        title += f" (orange: trained region {out['region']['spec']})"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
