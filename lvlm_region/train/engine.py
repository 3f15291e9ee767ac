"""Everything that touches DeepSpeed and torch.distributed: process group, collectives, config building, engine,
optimizer check, ZeRO-3 gathering, checkpoint state.

No other module of the package imports deepspeed or calls torch.distributed (tests/test_architecture.py).
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers
from deepspeed.accelerator import get_accelerator

from ..infra.timing import DTYPES

log = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# Keys the run config owns; a DeepSpeed JSON may leave them out or say "auto", but not disagree.
OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_min: float = 30.0) -> None:
    """Join the process group the `deepspeed` launcher set up; a plain `python` run becomes a world of one.

    ``timeout_min`` (--dist-timeout): how long a collective waits for the other ranks before it fails the run
    (DeepSpeed's default is 30 minutes). Long single-rank work between collectives (rank 0 preparing data) waits on
    the file system instead, with its own heartbeat timeout.
    """
    stale = stale_build_locks()
    if stale:
        raise ValueError(f"torch's JIT-build lock {stale[0]} is {stale[1] / 60:.0f} min old: a build of a DeepSpeed "
                           f"op was killed mid-way, and this launch would wait on it forever; remove that file (when "
                           f"no build is running) and rerun")
    orphan = orphaned_build_lock()
    if orphan:
        raise ValueError(f"torch's JIT-build lock {orphan} exists but no process on this machine is building there "
                         f"(watched for {ORPHAN_WATCH_S:g} s): a build of a DeepSpeed op was killed mid-way, and this "
                         f"launch would wait on it forever; remove that file and rerun")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   timeout=datetime.timedelta(minutes=timeout_min), verbose=False)
        atexit.register(_leave_process_group)
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        atexit.register(_unlink_shm_buffer, shm_buffer_path())
        threads = cpu_threads(os.environ, len(os.sched_getaffinity(0)))
        if threads is not None:
            torch.set_num_threads(threads)
    me = placement()
    log.info("rank %d of %d: local rank %d, node rank %d, host %s, pid %d, %d CPU thread(s)", me["rank"],
             world_size(), me["local_rank"], me["node_rank"], me["host"], me["pid"], me["cpu_threads"])


STALE_BUILD_LOCK_S = 600  # a JIT build of a DeepSpeed op takes 1-2 minutes on 2 CPU cores


def stale_build_locks(root: str | None = None, now: float | None = None) -> tuple[str, float] | None:
    """The oldest lock file of torch's JIT extension builds (cpp_extension) older than STALE_BUILD_LOCK_S, and its
    age in seconds; None when there is none.

    DeepSpeed JIT-builds its ops under that lock (deepspeed_shm_comm at start-up on CPU, cpu_adam for offload). A
    build killed mid-way leaves the lock, and every later launch then waits on it silently, before its first log
    line (seen on this project's machine). Root: TORCH_EXTENSIONS_DIR/<op>/lock, or torch's default
    root/<python>_<accelerator>/<op>/lock.
    """
    from torch.utils.cpp_extension import get_default_build_root
    base = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time() if now is None else now
    ages = []
    for lock in [*base.glob("*/lock"), *base.glob("*/*/lock")]:
        try:
            ages.append((now - lock.stat().st_mtime, str(lock)))
        except FileNotFoundError:  # the build just finished
            continue
    old = max((a for a in ages if a[0] > STALE_BUILD_LOCK_S), default=None)
    return (old[1], old[0]) if old else None


ORPHAN_WATCH_S = 10.0  # a live build has a process in its directory (ninja's working directory) within this time


def _building_in(directory: str) -> bool:
    """Whether a process on this machine has its working directory in ``directory`` (torch runs ninja there)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:  # gone, or not ours to read
                continue
            if cwd == directory or cwd.startswith(directory + os.sep):
                return True
    return False


def orphaned_build_lock(root: str | None = None, watch: float = ORPHAN_WATCH_S) -> str | None:
    """A JIT-build lock younger than STALE_BUILD_LOCK_S whose build is dead: no process on this machine works in its
    directory for ``watch`` seconds while the lock stays. None when there is none, and where this cannot be told: no
    /proc, or ranks on several nodes (the build directory may be on a shared file system, built by another node).

    stale_build_locks catches a lock by its age only; a build killed a minute ago left a launch waiting silently."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not os.path.isdir("/proc") or os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)) != world:
        return None
    from torch.utils.cpp_extension import get_default_build_root
    base = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = [*base.glob("*/lock"), *base.glob("*/*/lock")]
    deadline = time.time() + watch
    while locks:
        locks = [lock for lock in locks if lock.exists() and not _building_in(str(lock.parent))]
        if not locks or time.time() > deadline:
            break
        time.sleep(0.5)
    return str(locks[0]) if locks else None


def cpu_threads(env, cores: int) -> int | None:
    """The intra-op threads of a CPU rank: the cores it may run on, shared by the node's ranks.

    torch gives every process one thread per core, so N ranks on one node ran N times as many threads as cores. On
    this project's 2-core machine a 2-rank ZeRO-3 step of the demo took 0.6 to 2.7 s instead of 0.2 to 0.5 s (OpenMP
    threads spinning against each other; 6-step runs, twice each way). torchrun sets OMP_NUM_THREADS=1 for several
    local ranks; the deepspeed launcher does so only with --bind_cores_to_rank (which needs numactl). None (torch's
    default kept) when OMP_NUM_THREADS is set: the user's, or --bind_cores_to_rank's. Ranks per node: LOCAL_SIZE
    (deepspeed launcher) or LOCAL_WORLD_SIZE (torchrun).
    """
    if env.get("OMP_NUM_THREADS"):
        return None
    local = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, cores // max(local, 1))


def _leave_process_group() -> None:
    """Tear the process group down before interpreter shutdown. Left to finalisation, gloo's connection threads
    can outlive the peer's exit: a rank that had finished everything once aborted at exit ("terminate called
    without an active exception", status -6) in CI. Local only (no collective), so a failed peer cannot hang it."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; nothing to recover
            pass


def exit_process(code: int | None) -> None:
    """End a process that joined the process group, its work done and written: run the exit hooks (the process group
    torn down, the shared-memory buffer unlinked, data workers stopped, logs flushed), then leave without
    interpreter finalization.

    A finished rank aborted at exit in CI ("terminate called without an active exception", status -6, twice in one
    suite, both ZeRO-3, after the process group had been destroyed by the hook above), so a run that had trained,
    saved and evaluated was reported failed by the launcher. It did not reproduce here (both tests passed alone and
    in a full suite); the likely cause, not confirmed: DeepSpeed keeps references to the process groups and their async
    work, so gloo's C++ objects outlive destroy_process_group and are torn down during finalization, which torch
    does not support (pytorch/pytorch#179291 describes the same abort). Nothing is left to lose at this point: every
    file is closed and the streams are flushed here.
    A process that never joined a group exits normally.
    """
    code = 0 if code is None else int(code)
    if not dist.is_initialized():
        sys.exit(code)
    atexit._run_exitfuncs()  # noqa: SLF001 - the hooks registered above and by logging/multiprocessing, run once
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def shm_buffer_path() -> str:
    """The 69 MB shared-memory all-reduce buffer DeepSpeed's CPU backend creates for this rank.

    DeepSpeed 0.19 never unlinks it, so every CPU launch on a new port would leave one per rank in /dev/shm
    until memory runs out (seen here: 319 of them, 21 GB, then the OOM killer). The other ranks map it at
    start-up only, so removing the name at exit is safe.
    """
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank()}")


def _unlink_shm_buffer(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def placement() -> dict:
    """Where this rank runs. Node rank: GROUP_RANK (torchrun) or CROSS_RANK (deepspeed launcher)."""
    return {"rank": rank(), "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK", 0))),
            "host": socket.gethostname(), "pid": os.getpid(), "cpu_threads": torch.get_num_threads()}


def all_placements() -> list[dict]:
    """Every rank's placement, in rank order (a collective)."""
    out = [None] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(out, placement())
    else:
        out = [placement()]
    return out


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_named(values: dict[str, float]) -> dict[str, float]:
    """all_reduce_sum of named values in one collective: {name: the sum over ranks}."""
    return dict(zip(values, all_reduce_sum(list(values.values()))))


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (picklable objects)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def versions() -> dict:
    """The versions a run used (run.json). datasets is read where it is installed: the engine itself does not need
    it, and bench/gpu_check.py runs on machines without it."""
    try:
        import datasets
        have = datasets.__version__
    except ImportError:
        have = None
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "datasets": have}


def device() -> torch.device:
    acc = get_accelerator()
    return torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.device_name(), acc.current_device())


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def resolve_precision(precision: str) -> str:
    """auto: bf16 on GPU, fp32 on CPU (bf16 matmuls are slow there). bf16 / fp16 are refused here, before any
    weights load, where DeepSpeed's accelerator does not support them (its engine would refuse them later): fp16 on
    a CPU without AVX512-FP16, bf16 on a GPU older than Ampere."""
    if precision == "auto":
        return "fp32" if on_cpu() else "bf16"
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    supported = {"bf16": bool(acc.is_bf16_supported()), "fp16": bool(acc.is_fp16_supported()), "fp32": True}
    if not supported[precision]:
        needs = {"fp16": "a GPU, or a CPU with AVX512-FP16", "bf16": "an Ampere or newer GPU, or a CPU"}[precision]
        instead = " or ".join(p for p in ("bf16", "fp16", "fp32") if supported[p])
        raise ValueError(f"--precision {precision}: DeepSpeed's {acc.device_name()} accelerator on this machine does "
                         f"not support {precision} ({precision} needs {needs}); use {instead}")
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    return DTYPES[precision]


def build_ds_config(zero: int, ds_config_path: str | None, micro_batch: int, grad_accum: int,
                    grad_clip: float, precision: str, offload: bool = False, ranks: int | None = None) -> dict:
    """Read the ZeRO JSON and fill in what the run config owns, leaving no "auto" behind. ``offload`` (--offload,
    or --plan auto's choice): the optimizer state and step on the CPU (DeepSpeedCPUAdam), unless the JSON already
    says where they go. ``ranks``: the world the batch is for (default: this process group's; a dry run's own)."""
    path = Path(ds_config_path) if ds_config_path else DS_CONFIG_DIR / f"zero{zero}.json"
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found; ship ds_configs/ or pass --ds-config")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({e}); fix the file or pass another "
                         "--ds-config") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {path} holds a JSON {type(cfg).__name__}, not an object of settings; "
                         "start from ds_configs/zero2.json or zero3.json")
    ours = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip, "train_batch_size": micro_batch * grad_accum * (ranks or world_size())}
    for key in OWNED:
        if key in cfg and cfg[key] != "auto" and cfg[key] != ours[key]:
            raise ValueError(f"{path}: {key}={cfg[key]} disagrees with the run config ({ours[key]}); "
                             f"remove it from the JSON or set the matching flag")
        cfg[key] = ours[key]
    # --precision decides which section is on; the JSON's own settings of that section (fp16's loss scaling:
    # initial_scale_power, loss_scale_window, hysteresis, min_loss_scale) are kept.
    sections = {key: cfg.pop(key) for key in ("bf16", "fp16") if key in cfg}
    if precision in ("bf16", "fp16"):
        cfg[precision] = {**sections.get(precision, {}), "enabled": True}
    if "activation_checkpointing" in cfg:  # deepspeed.checkpointing is only used by models that call it
        raise ValueError(f"{path}: 'activation_checkpointing' configures DeepSpeed's checkpointing API, which "
                         "transformers models never call, so the run would silently keep every activation; remove "
                         "it and pass --grad-ckpt (non-reentrant checkpointing, which works with frozen layers)")
    autos = [k for k, v in _walk(cfg) if v == "auto"]
    if autos:
        raise ValueError(f"{path}: 'auto' is not resolved for {', '.join(autos)}; give explicit values")
    if offload:
        cfg.setdefault("zero_optimization", {}).setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
    cfg.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    cfg.setdefault("wall_clock_breakdown", False)
    try:  # DeepSpeed's own validation (unknown or mistyped keys), now rather than after the weights load
        from deepspeed.runtime.config import DeepSpeedConfig
        # with this process's world (a dry run's batch is for its own RANKS)
        DeepSpeedConfig(dict(cfg, train_batch_size=micro_batch * grad_accum * world_size()))
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, DeepSpeed's own asserts and errors
        raise ValueError(f"DeepSpeed rejects the config {path}: {type(e).__name__}: {e}") from None
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def overlap_comm(ds_config: dict) -> bool:
    """Whether gradient reduction overlaps the backward pass (DeepSpeed's default: on for ZeRO-3, off below)."""
    zero = ds_config.get("zero_optimization", {})
    return bool(zero.get("overlap_comm", zero.get("stage", 0) == 3))


def optimizer_offload(ds_config: dict) -> str:
    """Where the optimizer state lives: "none", "cpu" or "nvme"."""
    return ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup to the peak, then cosine to zero at total_steps."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def initialize(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float, total_steps: int,
               warmup_steps: int, lr_overrides: list[tuple[list[torch.nn.Parameter], float]] = (),
               done_steps: int = 0):
    """Build optimizer (trainable parameters only), scheduler and engine; check what the optimizer holds.

    ``lr_overrides``: (parameters, peak LR) for parameters that train at their own rate (the projector under
    LoRA); the rest use ``lr``. The schedule scales every group alike. ``done_steps``: optimizer steps already
    taken (an engine rebuilt mid-run): the schedule continues there (torch's own way, ``last_epoch``).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter requires grad; the region selects nothing to train")
    offload = optimizer_offload(ds_config)
    special = {id(p) for params, _ in lr_overrides for p in params}
    by_lr = [([p for p in trainable if id(p) not in special], lr)]
    by_lr += [([p for p in params if p.requires_grad], group_lr) for params, group_lr in lr_overrides]
    # Biases and norms take no weight decay; empty groups are dropped (they break ZeRO-1/2 init). A parameter's
    # dimensions are its whole shape's: ZeRO-3 leaves a partitioned one a flat local piece (ds_shape is the whole),
    # which put every matrix in the no-decay group (no weight decay at all under ZeRO-3) until an engine had
    # gathered the small ones for good, and then a rebuilt engine's groups differed from its first's.
    groups = [g for params, group_lr in by_lr
              for g in ({"params": [p for p in params if dims(p) >= 2], "weight_decay": weight_decay, "lr": group_lr},
                        {"params": [p for p in params if dims(p) < 2], "weight_decay": 0.0, "lr": group_lr})
              if g["params"]]
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr)
    log.info("optimizer %s (optimizer offload: %s)", type(optimizer).__name__, offload)
    for g in optimizer.param_groups:  # what LRScheduler reads when it starts at last_epoch > -1
        g.setdefault("initial_lr", g["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps),
                                                  last_epoch=done_steps - 1)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    check_optimizer(engine, trainable)
    return engine, scheduler


def dims(p: torch.nn.Parameter) -> int:
    """A parameter's number of dimensions, whole (ZeRO-3 partitioned or not)."""
    return len(getattr(p, "ds_shape", p.shape))


def optimizer_params(engine) -> list[torch.nn.Parameter]:
    """The model parameters the engine's optimizer updates, whatever wrapper ZeRO put around it."""
    opt = engine.optimizer
    for attr in ("fp16_groups", "bit16_groups"):  # ZeRO-3, ZeRO-1/2
        if hasattr(opt, attr):
            return [p for group in getattr(opt, attr) for p in group]
    inner = getattr(opt, "optimizer", opt)
    return [p for g in inner.param_groups for p in g["params"]]


def check_optimizer(engine, intended: list[torch.nn.Parameter]) -> None:
    """Fail unless the optimizer holds exactly the intended parameters (trap: late freezing is ignored)."""
    held = {id(p) for p in optimizer_params(engine)}
    want = {id(p) for p in intended}
    if held != want:
        names = {id(p): n for n, p in engine.module.named_parameters()}
        extra = sorted(names.get(i, "?") for i in held - want)
        missing = sorted(names.get(i, "?") for i in want - held)
        raise RuntimeError(f"optimizer parameters differ from the region: extra {extra[:5]}, missing {missing[:5]}")
    log.info("optimizer holds exactly the %d intended parameter tensors", len(want))


class PartitionedLoading:
    """Until ``close()``, under a ZeRO-3 config, transformers builds models inside ``deepspeed.zero.Init`` and
    loads each checkpoint tensor straight into its partitions: no rank materialises the full model (transformers'
    own mechanism: a referenced ``HfDeepSpeedConfig``). Close it once the model is loaded: while it is open,
    transformers and peft treat every model as partitioned, so rank 0 alone building the meta-device copy that
    lora.save merges would start collectives the other ranks never join (seen: a hang in the save).
    Other stages: a no-op.
    """

    def __init__(self, ds_config: dict):
        self.enabled = zero_stage(ds_config) == 3
        if self.enabled:
            from transformers.integrations import HfDeepSpeedConfig
            self._keep = HfDeepSpeedConfig(ds_config)

    def writable(self, params):
        """Context in which ``params`` are whole on every rank and what rank 0 writes into them is kept."""
        return gathered(params, self.enabled, modifier_rank=0)

    def close(self) -> None:
        if self.enabled:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
            self.enabled, self._keep = False, None


def last_micro_step(engine, last: bool) -> None:
    """Mark whether the next forward / backward ends the gradient accumulation (reduced and readable with
    full_grad after it), for code that accumulates without stepping (DeepSpeed counts micro-steps in step())."""
    engine.set_gradient_accumulation_boundary(last)


def full_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """A parameter's whole accumulated gradient after backward and before step, whatever ZeRO partitioned (every rank
    gets all of it: DeepSpeed's safe_get_full_grad)."""
    from deepspeed.utils import safe_get_full_grad
    return safe_get_full_grad(param)


def is_zero3(engine) -> bool:
    """Whether ``engine`` partitions its parameters (ZeRO-3); a plain model (inference_model) does not."""
    return hasattr(engine, "zero_optimization_partition_weights") and engine.zero_optimization_partition_weights()


def inference_model(model: torch.nn.Module, ds_config: dict):
    """``model`` (frozen) ready for evaluation on this rank: under ZeRO-3 a DeepSpeed engine without optimizer,
    which gathers each layer's partitioned weights as it runs (the model must have been built under
    PartitionedLoading); otherwise the model itself on this rank's device, whole on every rank."""
    model.requires_grad_(False)
    if zero_stage(ds_config) == 3:
        ds_engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        ds_engine.eval()
        return ds_engine
    return model.to(device()).eval()


def full_state_dict(engine) -> dict | None:
    """The whole model's weights on rank 0 (None elsewhere); under ZeRO-3 gathered layer by layer.

    Call on every rank. Frozen weights are included.
    """
    if is_zero3(engine):
        return engine._zero3_consolidated_16bit_state_dict()
    if rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def gathered(params, enabled: bool, modifier_rank: int | None = None):
    """Context that materialises ZeRO-3 partitioned parameters on every rank; read-only unless
    ``modifier_rank`` is given (then what that rank writes is scattered back to the partitions)."""
    import contextlib
    if not enabled:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def master_weights(engine, params: list) -> list | None:
    """The fp32 master copies the engine's optimizer keeps of ``params`` (whole, on the CPU) under bf16 / fp16; None
    in fp32, where the parameters are their own masters. Every rank calls it (ZeRO-3 gathers the partitions)."""
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return None
    from deepspeed.utils import safe_get_full_fp32_param
    return [safe_get_full_fp32_param(p).detach().cpu() for p in params]


def set_master_weights(engine, params: list, masters: list | None) -> None:
    """Give the engine's optimizer the fp32 masters ``master_weights`` read from another engine (it made its own
    from the 16-bit weights, which lost what lies below 16-bit precision)."""
    if masters is None:
        return
    from deepspeed.utils import safe_set_full_fp32_param
    for p, master in zip(params, masters):
        safe_set_full_fp32_param(p, master.to(device()))


def release(engine, model_continues: bool = False) -> None:
    """Free an engine's memory before another one is built in the same process.

    ``model_continues``: the next engine wraps the same model (a moving region's switch). DeepSpeed 0.19's
    ``destroy()`` leaves the engine's forward pre- and post-hooks on the module, so the old engine would keep running
    its forward prologue and epilogue in every later step, and stay alive through them; they are removed here. And
    every parameter its optimizer held gets storage of its own: ZeRO-1/2 keep the trained parameters as views into one
    flat buffer per group, ZeRO-3 their partitions, and a parameter that stops training would otherwise keep the old
    buffer alive (seen: every earlier period's buffers stayed allocated, under ZeRO-2 the trained layers' weights once
    more per switch), as would the optimizer references ZeRO leaves on the parameters (seen with optimizer offload:
    the old optimizer and its state stayed)."""
    if model_continues:
        zero3 = is_zero3(engine)
        for p in optimizer_params(engine):
            if zero3:
                p.ds_tensor.data = p.ds_tensor.data.clone()
            else:
                p.data = p.data.clone()
        for p in engine.module.parameters():  # back-references ZeRO leaves on the parameters (ZeRO-2 with offload:
            for attr in ("_zero_optimizer", "_z3_optimizer"):  # _zero_optimizer; ZeRO-3: _z3_optimizer on all)
                if getattr(p, attr, None) is engine.optimizer:
                    delattr(p, attr)
    engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        hook = getattr(engine, name, None)
        if hook is not None:
            hook.remove()
            setattr(engine, name, None)
    del engine
    import gc
    gc.collect()
    if not on_cpu():
        get_accelerator().empty_cache()


def save_state(engine, save_dir: str, tag: str) -> None:
    """DeepSpeed's own checkpoint of everything that trains (weights incl. frozen ones, optimizer, scheduler).

    Written to ``save_dir/tag`` by every rank; no "latest" file (the caller commits the directory itself).
    """
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False)


def load_state(engine, load_dir: str, tag: str) -> None:
    """Restore ``load_dir/tag`` written by save_state: weights, optimizer and LR scheduler states."""
    try:
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=True)
    except ValueError as e:
        if "number of parameter groups" not in str(e):
            raise
        raise ValueError(f"the checkpoint {os.path.join(load_dir, tag)} holds other optimizer parameter groups than "
                         f"this run builds ({e}); a ZeRO-3 checkpoint written before the weight-decay groups read each "
                         "parameter's whole shape (2026-12-04) holds one group per learning rate: finish that run "
                         "with the version that wrote it, or start it again") from None
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {os.path.join(load_dir, tag)}")


def rng_state() -> dict:
    """This rank's accelerator RNG state (the CPU generators are saved by the caller)."""
    return {} if on_cpu() else {"accelerator": get_accelerator().get_rng_state()}


def set_rng_state(state: dict) -> None:
    if "accelerator" in state and not on_cpu():
        get_accelerator().set_rng_state(state["accelerator"])
