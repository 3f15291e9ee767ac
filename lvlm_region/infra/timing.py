"""The timing harness inside every run: per-step phases, work done, FLOPs, MFU, peak memory, run totals.

Phases are measured with device events on GPU (recorded without synchronising; read once per step after the
step's own loss all-reduce has synchronised anyway) and with the wall clock on CPU, so the harness adds no
synchronisation of its own. MFU = model FLOPs (lvlm_region.model.flops: forward + activation + weight gradients of
what actually trains, never 6N) / (step time x peak). Peaks: dense bf16 TFLOP/s per GPU from PEAK_TFLOPS by
device name, ``--peak-tflops`` to override, and on CPU a matmul measured at start-up.
"""
from __future__ import annotations

import contextlib
import platform
import resource
import time
from dataclasses import dataclass, field

import torch

# Dense bf16 tensor-core peaks (TFLOP/s per GPU) from the vendors' data sheets, matched against the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
               "V100": 125.0}
PHASES = ("data", "forward", "backward", "optimizer", "switch")  # switch: a moving region rebuilding its engine


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"


def measure_cpu_peak(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the best of a few n x n matmuls in ``dtype`` on this CPU (all threads torch uses)."""
    g = torch.Generator().manual_seed(0)  # its own: measuring must not move the training RNG (resume exactness)
    a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# --precision -> the dtype weights, states and activations are held in (engine.torch_dtype, the planner)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_flops(override_tflops: float | None = None, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """Peak FLOP/s per rank for MFU and where the figure comes from (on CPU: measured in the run's dtype)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if torch.cuda.is_available():
        return peak_for_gpu(torch.cuda.get_device_name())
    name = next(k for k, v in DTYPES.items() if v == dtype)
    return measure_cpu_peak(dtype=dtype), f"measured {name} matmul on this CPU"


def peak_for_gpu(name: str) -> tuple[float, str]:
    """The data-sheet peak for a GPU by its device name (``torch.cuda.get_device_name()``)."""
    for key, tflops in PEAK_TFLOPS.items():  # H200 before H100: the first key found in the name wins
        if key in name:
            return tflops * 1e12, f"bf16 data sheet ({key})"
    raise ValueError(f"no peak FLOP/s known for GPU {name!r} (known: {', '.join(PEAK_TFLOPS)}); pass --peak-tflops")


def reset_peak_memory() -> None:
    """Start a new peak for this run (GPU only: a process's peak resident memory on CPU cannot be reset)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak device memory of this rank (GPU), or the process's peak resident memory (CPU)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _Clock:
    """One timestamp source: CUDA events on GPU (no sync when recorded), perf_counter on CPU."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class StepTimer:
    """Phase times within one step: ``start()``, ``with timer.phase("forward"): ...``, then ``finish()``."""

    def __init__(self):
        self.clock, self._marks, self._start = _Clock(), [], None

    def start(self) -> None:
        self._marks, self._start = [], self.clock.now()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = self.clock.now()
        yield
        self._marks.append((name, t0, self.clock.now()))

    def finish(self) -> dict:
        """Seconds per phase and in total for the step just ended."""
        end = self.clock.now()
        if self.clock.cuda:
            end.synchronize()
        out = {p: 0.0 for p in PHASES}
        for name, a, b in self._marks:
            out[name] += self.clock.seconds(a, b)
        out["step"] = self.clock.seconds(self._start, end)
        return out


@dataclass
class Totals:
    """Steady-state sums over the steps after each session's warm-up (all ranks' work, wall time once)."""

    warmup: int  # steps skipped at the start of every session (compilation, allocator, first data)
    steps: int = 0
    seconds: float = 0.0
    phases: dict = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    tokens: float = 0.0
    samples: float = 0.0
    images: float = 0.0
    model_flops: float = 0.0
    hardware_flops: float = 0.0
    all_steps: int = 0  # every step, warm-up included
    all_tokens: float = 0.0
    all_samples: float = 0.0
    _seen: int = 0

    def add(self, times: dict, tokens: float, samples: float, images: float, flops_model: float,
            flops_hw: float) -> None:
        self._seen += 1
        self.all_steps, self.all_tokens, self.all_samples = (self.all_steps + 1, self.all_tokens + tokens,
                                                             self.all_samples + samples)
        if self._seen <= self.warmup:
            return
        self.steps += 1
        self.seconds += times["step"]
        for p in PHASES:
            self.phases[p] += times.get(p, 0.0)
        self.tokens, self.samples, self.images = self.tokens + tokens, self.samples + samples, self.images + images
        self.model_flops, self.hardware_flops = self.model_flops + flops_model, self.hardware_flops + flops_hw

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def restore(self, state: dict | None) -> None:
        """Continue the sums of an earlier session (its warm-up setting stays this session's)."""
        for k, v in (state or {}).items():
            if k == "phases":  # a phase an earlier version did not time starts at 0
                self.phases = {**self.phases, **v}
            elif k != "warmup":
                setattr(self, k, v)

    def summary(self, world: int, peak: float) -> dict:
        totals = {"steps_total": self.all_steps, "tokens_total": self.all_tokens, "samples_total": self.all_samples}
        if not self.steps:
            return {"steady_steps": 0, **totals}
        return {**totals, "steady_steps": self.steps, "warmup_steps_per_session": self.warmup,
                "step_seconds": self.seconds / self.steps,
                "phase_seconds": {p: v / self.steps for p, v in self.phases.items()},
                "tokens_per_s_per_gpu": self.tokens / self.seconds / world,
                "samples_per_s": self.samples / self.seconds, "images_per_s": self.images / self.seconds,
                "model_tflops_per_step": self.model_flops / self.steps / 1e12,
                "hardware_tflops_per_step": self.hardware_flops / self.steps / 1e12,
                "mfu": self.model_flops / (self.seconds * world * peak),
                "hfu": self.hardware_flops / (self.seconds * world * peak)}


def model_states(total_params: int, trainable_params: int, zero_stage: int, world: int, precision: str,
                 offload_optimizer: bool, largest: int = 0) -> dict:
    """Model-state bytes per rank (activations not included): a run's logged estimate and the planner's (plan.py).

    DeepSpeed's own accounting (estimate_zero2/3_model_states_mem_needs count exactly this for full tuning),
    applied per parameter, so frozen ones cost only their weights. 16-bit weights (fp32: 4 bytes), partitioned
    under ZeRO-3. A trainable parameter adds, with mixed precision: ZeRO-2 its 16-bit gradient partition and the
    fp32 copy of it the optimizer steps on, ZeRO-3 the fp32 gradient partition it reduces into (6 / 4 bytes); the fp32
    master weight and Adam's two moments (12 bytes). In fp32: the gradient (4) and the moments (8). Gradients are
    partitioned from ZeRO-2 on, optimizer state from ZeRO-1 on; offload keeps gradients and optimizer state on the
    CPU. ZeRO-3 gathers a module's weights and gradients into buffers sized by the largest module (``largest``
    parameters: 2 x 16-bit). With mixed precision, ZeRO-2: 2 N + 18 T / world; ZeRO-3: 4 L + (2 N + 16 T) / world.
    """
    w = 2 if precision in ("bf16", "fp16") else 4
    mixed = w == 2
    zero3 = zero_stage >= 3
    weights = total_params * w / (world if zero3 else 1)
    grad_bytes = (4 if zero3 else 6) if mixed else 4
    grads = trainable_params * grad_bytes / (world if zero_stage >= 2 else 1)
    optim = trainable_params * (12 if mixed else 8) / (world if zero_stage >= 1 else 1)
    gather = 2 * w * largest if zero3 else 0
    on_device = weights + gather + (0 if offload_optimizer else grads + optim)
    return {"weights": weights, "gradients": grads, "optimizer": optim, "gather_buffer": gather,
            "optimizer_on_device": 0 if offload_optimizer else optim, "total_on_device": on_device}
