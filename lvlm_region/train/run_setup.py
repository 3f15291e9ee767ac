"""What a run needs before its first weight loads, checked and built in that order: the run config, the output
directory, the checkpoint to resume, the process group, the DeepSpeed JSON, the demo or an assembled model, the
region, the template and image layout, prepared data on every rank (``obtain_data``). Training (trainer) and
standalone evaluation (eval_run) both start here.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from transformers import AutoConfig, AutoTokenizer

from ..config import DEMO_DIR, PLANNED, RunConfig, flag
from ..data import demo, formats, prepare, templates
from ..data.images import ImageLoader
from ..infra import outputs, timing
from ..model import assemble, families, regions, schedule
from ..model.families import find_parts
from ..model.load import num_decoder_layers, resolve_attention, skeleton
from ..model.projector import read_mm_projector
from ..model.lora import target_modules
from ..model.trainable import apply_region
from . import checkpoint, engine, plan

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Everything a run needs before its first step."""

    cfg: RunConfig
    region: regions.Region
    precision: str
    ds_config: dict
    processor: object
    tokenizer: object
    encoding: prepare.Encoding  # template, image layout and max length: how samples become token ids
    load_image: ImageLoader  # the processor with the run's aspect-ratio handling
    attn: str  # the attention implementation actually used
    projector: dict | None = None  # --init-projector's tensors, keyed as the projector's state_dict
    resume_from: Path | None = None  # the checkpoint to continue from (None: a fresh start)
    schedule: schedule.Schedule | None = None  # --region-schedule over the region's layers (None: it stays)


# Seen with DeepSpeed 0.19.8: after a moving region's engine rebuild under ZeRO-3, the recompute of a checkpointed
# layer in the backward pass runs on parameters ZeRO-3 did not gather (torch's CheckpointError: shape [0] recomputed).
MOVING_ZERO3_CKPT = ("--region-schedule with --grad-ckpt under ZeRO-3 is not supported: after the first switch "
                     "DeepSpeed 0.19's ZeRO-3 does not gather the parameters of a checkpointed layer's recompute, "
                     "and the step fails; use --zero 2 with --grad-ckpt, or ZeRO-3 without it")


def setup(cfg: RunConfig, trains: bool = True) -> Setup:
    """Validate everything that can be checked without loading weights: config, region, DeepSpeed JSON, data.

    ``trains``: a training run, whose output directory gets a model, run.json and checkpoints (checked here). An
    evaluation, importance scoring or speed measurement (False) writes only its report and its own ``prepared/``
    there, which replaces nothing it did not write, so a report may go beside the model it reads."""
    cfg.resolve()
    check_region_early(cfg)
    # The output directory, the inputs and the DeepSpeed JSON are checked before the demo or an assembly is built
    # and before any weights load.
    resume_from = None
    if trains:
        outputs.check_run_dir(cfg.output_dir, {"--model": cfg.model, "--init": cfg.init, "--init-projector":
                                               cfg.init_projector, "--llm": cfg.llm, "--vision": cfg.vision,
                                               "--data": cfg.data, "--eval-data": cfg.eval_data,
                                               "--text-eval-data": cfg.text_eval_data,
                                               "--image-folder": cfg.image_folder},
                              fresh=cfg.resume in (None, "none"), overwrite=cfg.overwrite)
        if cfg.resume == "auto" and not cfg.overwrite:
            checkpoint.check_finished(cfg)  # a finished run: AlreadyComplete, nothing is touched
        resume_from = checkpoint.resolve_resume(cfg.resume, cfg.output_dir, cfg.overwrite)
    engine.init_distributed(cfg.dist_timeout)
    if cfg.plan == "auto" and cfg.gpu_memory_gb is None and engine.on_cpu():
        raise ValueError("--plan auto on CPU needs --gpu-memory-gb: the memory per GPU to fit the run in (there is no "
                         "GPU whose memory it could read)")
    if cfg.global_batch is not None and cfg.plan != "auto":
        cfg.grad_accum = accumulation(cfg, cfg.global_batch)
    precision = engine.resolve_precision(cfg.precision)
    ds_config = engine.build_ds_config(cfg.zero, cfg.ds_config, cfg.micro_batch, cfg.grad_accum, cfg.grad_clip,
                                       precision, cfg.offload)
    if cfg.is_demo:
        if engine.rank() == 0:
            demo.ensure(DEMO_DIR)
        engine.barrier()
        if engine.rank() == 0 and cfg.stage == "sft" and cfg.init is None:
            log.info("no --init given: stage 2 starts from the embedded demo model's random projector "
                     "(run launch/pretrain.py first and pass --init to start from a trained one)")
    if cfg.llm is not None:  # every rank checks the parts' configs; rank 0 builds the model once
        assemble.check(cfg.llm, cfg.vision, cfg.projector)
        # The template must render with the LLM's own tokenizer before anything is built (auto needs one of its own);
        # a built-in one is written into the assembled tokenizer, so the output carries what it was trained with.
        fmt = templates.resolve(cfg.template, AutoTokenizer.from_pretrained(cfg.llm), f"--llm {cfg.llm}")
        chat_template = fmt.source if fmt.conversational else None
        if engine.rank() == 0 and not assemble.is_assembled(cfg.model_path, cfg.llm, cfg.vision, cfg.projector,
                                                            cfg.seed, chat_template):
            assemble.assemble(cfg.llm, cfg.vision, cfg.projector, cfg.model_path, cfg.seed, chat_template)
        engine.barrier()
    if not os.path.isfile(os.path.join(cfg.model_path, "config.json")):
        raise FileNotFoundError(f"--model {cfg.model_path}: no config.json; give a local transformers checkpoint dir")
    model_config = AutoConfig.from_pretrained(cfg.model_path)
    region, shape, moving = run_region(cfg, model_config)
    if cfg.tuner == "lora" and not region.layers:
        raise ValueError(f"--tuner lora: region {region.spec!r} selects no decoder layer, so there is nothing to put "
                         "LoRA on; give a region with layers (e.g. --region uniform25) or use --tuner full")
    if cfg.tuner == "lora":
        target_modules(shape, region)  # a region whose modules have no linear (an MoE .mlp) is refused here
    if moving and cfg.grad_ckpt and engine.zero_stage(ds_config) == 3:
        raise ValueError(MOVING_ZERO3_CKPT)
    attn, why = resolve_attention(cfg.attn, not engine.on_cpu(), precision)
    if why and engine.rank() == 0:
        log.warning("--attn: %s", why)
    if torch.cuda.is_available() and not cfg.peak_tflops:
        timing.peak_for_gpu(torch.cuda.get_device_name())  # an unknown GPU fails here, on every rank, not at step 1
    encoding, tokenizer, processor = prepare.for_model(cfg.model_path, cfg.template, cfg.max_length, cfg.verify_images,
                                                 cfg.image_aspect_ratio, cfg.allow_outside_images)
    family = families.get(model_config.model_type)
    family.check_checkpoint(cfg.model_path, model_config, engine.zero_stage(ds_config))
    if cfg.packing and family.no_packing:
        raise ValueError(f"--packing: {model_config.model_type} {family.no_packing}; train it without --packing")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {cfg.model_path} has no pad token; set one and save it")
    fmt = encoding.template
    if fmt.conversational and fmt.name != "auto":  # the exported model formats prompts as it was trained
        tokenizer.chat_template = processor.chat_template = fmt.source
    for path in (cfg.data, cfg.eval_data, cfg.text_eval_data):  # a prepared dir must match this model and template
        if path and prepare.is_prepared(path):
            prepare.check_matches(prepare.read_meta(path), path, encoding, tokenizer)
        elif path:
            formats.kind(path)
    projector = None
    if cfg.init_projector:  # read and checked against the config's shapes before any weights load
        projector = read_mm_projector(cfg.init_projector, find_parts(shape).projector)
    load_image = ImageLoader(processor.image_processor, cfg.image_aspect_ratio, encoding.layout.tensor_keys)
    return Setup(cfg, region, precision, ds_config, processor, tokenizer, encoding, load_image, attn, projector,
                 resume_from, moving)


def dry_run(cfg: RunConfig, ranks: int) -> dict:
    """--dry-run: the run resolved without preparing data or loading weights (the model's config.json only): region,
    trainable parameters, template, batch arithmetic, DeepSpeed JSON, and the inputs this machine does not have."""
    cfg.resolve(check_paths=False)
    if cfg.is_demo:
        model_config = demo.planned_config()
    elif cfg.llm is not None:  # the Llava the run would assemble, from the parts' configs
        model_config = assemble.planned_config(cfg.llm, cfg.vision, cfg.projector)
    elif not os.path.isfile(os.path.join(cfg.model_path, "config.json")):
        raise FileNotFoundError(f"--model {cfg.model_path}: no config.json; a dry run reads the model's config.json")
    else:
        model_config = AutoConfig.from_pretrained(cfg.model_path)
    region, shape, moving = run_region(cfg, model_config)
    # a moving region's trainable parameters: its first period's
    counts = (apply_region(shape, moving.region(0) if moving else region, cfg.tuner) if cfg.tuner == "full"
              else None)
    if cfg.global_batch is not None and cfg.plan != "auto":
        cfg.grad_accum = accumulation(cfg, cfg.global_batch, ranks)
    precision = cfg.precision if cfg.precision != "auto" else "bf16 on GPU, fp32 on CPU"
    ds = engine.build_ds_config(cfg.zero, cfg.ds_config, cfg.micro_batch, cfg.grad_accum, cfg.grad_clip,
                                cfg.precision if cfg.precision != "auto" else "bf16", cfg.offload, ranks=ranks)
    tokenizer_there = os.path.isfile(os.path.join(cfg.llm or cfg.model_path, "tokenizer_config.json"))
    template = cfg.template if cfg.template != "auto" else (
        "auto (the tokenizer's own chat template)" if tokenizer_there or cfg.is_demo else
        f"auto (the tokenizer's own chat template; {cfg.llm or cfg.model_path} has no tokenizer_config.json here)")
    paths = {"--data": cfg.data, "--eval-data": cfg.eval_data, "--text-eval-data": cfg.text_eval_data,
             "--image-folder": cfg.image_folder, "--init": cfg.init, "--init-projector": cfg.init_projector,
             "--ds-config": cfg.ds_config, "--llm": cfg.llm, "--vision": cfg.vision}
    return {
        "model": (shown(cfg, "model") or cfg.model_path) if cfg.llm is None else
        f"{shown(cfg, 'llm')} + {shown(cfg, 'vision')} (assembled)",
        "model_type": model_config.model_type,
        "decoder_layers": num_decoder_layers(model_config), "region": region.to_dict(),
        **({"region_schedule": {"schedule": moving.text, "candidates": list(region.layers),
                                "first_periods": moving.periods(3 * moving.every)}} if moving else {}),
        "trainable_parameters": counts["all"]["trainable"] if counts else "LoRA adapters (counted at launch)",
        "total_parameters": counts["all"]["total"] if counts else None, "tuner": cfg.tuner, "template": template,
        "image_aspect_ratio": cfg.image_aspect_ratio, "max_length": cfg.max_length, "precision": precision,
        "ranks": ranks, "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum,
        "global_batch": cfg.micro_batch * cfg.grad_accum * ranks, "lr": cfg.lr, "projector_lr": cfg.projector_lr,
        "lr_groups": cfg.part_lrs(), "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "plan": "--plan auto: ZeRO stage, offload, checkpointing and batch split are chosen at launch from the "
                "prepared data" if cfg.plan == "auto" else "off",
        "ds_config": ds, "missing_here": {k: v for k, v in paths.items() if v and not os.path.exists(v)}}


def config_region(spec: str, model_config) -> tuple[regions.Region, torch.nn.Module]:
    """``spec`` resolved against a model's config alone, and the meta-device skeleton it was read from (no weights)."""
    shape = skeleton(model_config)
    return regions.resolve(spec, num_decoder_layers(model_config), tied=find_parts(shape).tied), shape


def run_region(cfg: RunConfig, model_config) -> tuple[regions.Region, torch.nn.Module, schedule.Schedule | None]:
    """The run's region resolved against the model's config (config_region), its --lr-groups checked against it, and
    its --region-schedule (None: the region stays); ValueError naming the fault, before any weights load."""
    region, shape = config_region(cfg.region, model_config)
    check_lr_groups(cfg, region)
    return region, shape, (schedule.resolve(cfg.region_schedule, region, cfg.seed) if cfg.region_schedule else None)


def check_lr_groups(cfg: RunConfig, region: regions.Region) -> None:
    """Refuse, before any weights load, an --lr-groups part that the region trains nothing of."""
    for part, lr in cfg.part_lrs().items():
        trains = bool(region.layers) if part == "region" else region.parts[part]
        if not trains:
            what = "no decoder layer" if part == "region" else f"no {part} parameter"
            fix = "a region with layers" if part == "region" else f"+{part} in the region"
            raise ValueError(f"--lr-groups {part}={lr:g}: region {region.spec!r} trains {what}, so the group would be "
                             f"empty; give {fix}, or drop {part} from --lr-groups")


def shown(cfg: RunConfig, name: str) -> str | None:
    """Field ``name`` as the user gave it: a hub id rather than its cache directory."""
    return (cfg.sources or {}).get(name, {}).get("id") or getattr(cfg, name)


def check_region_early(cfg: RunConfig) -> None:
    """The region spec against the LLM's depth before the demo is generated or a model assembled (minutes of work):
    the demo's architecture is known before it exists, an --llm's depth from its config.json. A --model's spec is
    resolved from its config in setup, before any weights load."""
    region = None
    if cfg.is_demo:
        region = config_region(cfg.region, demo.planned_config())[0]
    elif cfg.llm is not None and os.path.isfile(os.path.join(cfg.llm, "config.json")):
        text = AutoConfig.from_pretrained(cfg.llm).get_text_config()
        region = regions.resolve(cfg.region, text.num_hidden_layers,
                                 tied=bool(getattr(text, "tie_word_embeddings", False)))
    if region is not None and cfg.region_schedule:
        schedule.resolve(cfg.region_schedule, region, cfg.seed)


def accumulation(cfg: RunConfig, global_batch: int, ranks: int | None = None) -> int:
    """--grad-accum for --global-batch without a plan: the global batch over --micro-batch x ranks (default: the
    process group's)."""
    ranks = ranks or engine.world_size()
    per_step = cfg.micro_batch * ranks
    if global_batch % per_step:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of --micro-batch {cfg.micro_batch} x "
                         f"{ranks} ranks; change one of them (or let --plan auto split it)")
    if cfg.given("grad_accum") and cfg.grad_accum != global_batch // per_step:
        raise ValueError(f"--global-batch {global_batch} = --micro-batch {cfg.micro_batch} x {ranks} "
                         f"ranks x accumulation {global_batch // per_step}, but --grad-accum {cfg.grad_accum} was "
                         "given; drop one of them")
    return global_batch // per_step


def plan_run(s: Setup, train_ds, image_folder: str) -> dict:
    """--plan auto: the planner's fastest fitting ZeRO stage, offload, checkpointing and micro-batch for this model,
    region, tuner, rank count and GPU memory, on the prepared training data's shape (plan.data_shape: lengths, and
    its images' sizes in ``image_folder``). Fields the user set (RunConfig.given; --ds-config fixes the ZeRO stage
    and offload) keep their values and restrict the candidates. Sets them in ``s.cfg`` and rebuilds ``s.ds_config``;
    returns what run.json records. Raises ValueError, before any weights load, when nothing fits."""
    cfg = s.cfg
    if s.attn == "eager":
        raise ValueError("--plan auto models attention as flash / sdpa keep it; eager attention's T x T weights are "
                         "not modelled, so its plan could run out of memory. Use --attn sdpa (or "
                         "flash_attention_2), or set --zero, --micro-batch and --grad-ckpt yourself without --plan")
    world = engine.world_size()
    global_batch = cfg.global_batch or cfg.micro_batch * cfg.grad_accum * world
    given = [name for name in PLANNED if cfg.given(name)]
    fixed = {name: getattr(cfg, name) for name in given}
    if cfg.ds_config is not None:  # the user's JSON decides the stage and the offload (none, unless it has one)
        fixed["zero"] = engine.zero_stage(s.ds_config)
        fixed["offload"] = engine.optimizer_offload(s.ds_config) != "none"
    on_gpu = torch.cuda.is_available() and not engine.on_cpu()
    memory = cfg.gpu_memory_gb or torch.cuda.get_device_properties(engine.device()).total_memory / plan.GIB
    peak = cfg.peak_tflops or timing.peak_flops(None, engine.torch_dtype(s.precision))[0] / 1e12
    # Every rank must choose the same plan: the smallest memory of any rank, rank 0's peak (measured on CPU).
    mine = engine.all_gather_object((memory, peak))
    memory, peak = min(m for m, _ in mine), mine[0][1]
    # a moving region is planned for its period that needs the most memory (Schedule.largest)
    spec = cfg.region if s.schedule is None else s.schedule.largest().explicit()
    setting = plan.Setting(model=cfg.model_path, region=spec, tuner=cfg.tuner, lora_r=cfg.lora_r,
                           lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, gpus=world,
                           gpu=timing.device_name() if on_gpu else "cpu", gpu_memory_gb=memory, peak_tflops=peak,
                           **plan.data_shape(train_ds, image_folder=image_folder), samples=len(train_ds),
                           global_batch=global_batch, precision=s.precision, group_by_length=cfg.group_by_length,
                           packing=cfg.packing, overlap_comm=engine.overlap_comm(s.ds_config))
    chosen, cands = plan.choose(setting, fixed, moving=s.schedule is not None)
    kept = [flag(n) for n in given] + (["--ds-config"] if cfg.ds_config is not None else [])
    if not cands:
        raise ValueError(f"--plan auto: {plan.no_candidate(setting, fixed, kept)}")
    if chosen is None:
        smallest = min(cands, key=lambda c: c.memory_gb["total"])
        need = f"the smallest, {plan.row(spec, asdict(smallest))}, needs {smallest.memory_gb['total']:.2f} GiB"
        rank_text = f"{world} rank{'s' if world > 1 else ''}"
        raise ValueError(f"--plan auto: nothing fits {memory:g} GiB per GPU with global batch {global_batch} on "
                         f"{rank_text} ({need}); use more GPUs, a smaller --global-batch, a smaller region, or drop "
                         f"flags that fix the choice ({', '.join(kept) or 'none given'})")
    for name in PLANNED:
        setattr(cfg, name, getattr(chosen, name))
    s.ds_config = engine.build_ds_config(cfg.zero, cfg.ds_config, cfg.micro_batch, cfg.grad_accum, cfg.grad_clip,
                                         s.precision, cfg.offload)
    record = {"chosen": asdict(chosen), "kept": kept, "setting": setting.record(),
              "candidates": len(cands), "fitting": sum(c.fits for c in cands)}
    if engine.rank() == 0:
        log.info("--plan auto (%d of %d candidates fit %.2f GiB; kept as given: %s):\n%s\n%s", record["fitting"],
                 len(cands), memory, ", ".join(kept) or "nothing", plan.HEADER,
                 plan.row(spec, record["chosen"]))
    return record


def obtain_data(path: str, image_folder: str | None, name: str, s: Setup):
    """(prepared dataset, image folder) for --data / --eval-data / --text-eval-data.

    A prepared directory is used as it is. A raw file is prepared once, by rank 0, into OUTPUT_DIR/prepared/NAME
    (reused by a rerun or resume with the same inputs) while the other ranks wait for it on the file system: a
    collective would time out on a data set that takes longer than the process group's timeout to prepare.
    """
    if prepare.is_prepared(path):
        ds, meta = prepare.load_prepared(path)
        return ds, image_folder or meta["identity"]["image_folder"]
    cfg = s.cfg
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    out = os.path.join(cfg.output_dir, "prepared", name)
    failed, beat = out + ".failed", out + ".heartbeat"
    if engine.rank() == 0:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if os.path.exists(failed):
            os.remove(failed)
        open(beat, "w").close()  # fresh before anyone waits on it
    engine.barrier()
    if engine.rank() == 0:
        try:
            with outputs.Heartbeat(beat):
                ds = prepare.prepare(path, folder, s.encoding, s.tokenizer, out, cfg.on_bad_sample,
                                     cfg.max_bad_fraction, cfg.prep_workers)
        except Exception as e:
            with open(failed, "w") as f:
                f.write(str(e))
            raise
        return ds, folder
    wait_for_preparation(path, out, prepare.identity(path, folder, s.encoding, s.tokenizer), cfg.prep_timeout)
    return datasets.load_from_disk(out), folder


def wait_for_preparation(path: str, out: str, want: dict, timeout: float) -> None:
    """Wait (on the file system, see obtain_data) until rank 0 has prepared ``path`` into ``out``. Raises DataError
    when rank 0 reports a failure, or when its heartbeat file has not changed for ``timeout`` seconds (rank 0 was
    killed, e.g. by the OOM killer, and can report nothing)."""
    failed, beat = out + ".failed", out + ".heartbeat"
    start = last_log = time.time()
    while not (prepare.is_prepared(out) and prepare.read_meta(out)["identity"] == want):
        if os.path.exists(failed):
            raise prepare.DataError(f"rank 0 failed to prepare {path}: {open(failed).read()}")
        silent = outputs.silence(beat, start)
        if silent > timeout:
            raise prepare.DataError(f"rank {engine.rank()}: rank 0 has given no sign of life for {silent:.0f} s while "
                                    f"preparing {path} (its heartbeat {beat} stopped changing): it probably died "
                                    f"(killed, out of memory); see its log, then rerun (--prep-timeout, now "
                                    f"{timeout:g} s, sets this wait)")
        time.sleep(0.2)  # a stat and a small read: polling often costs nothing
        if time.time() - last_log > 120:
            last_log = time.time()
            log.info("rank %d: waiting for rank 0 to prepare %s (%.0f s)", engine.rank(), path, last_log - start)
