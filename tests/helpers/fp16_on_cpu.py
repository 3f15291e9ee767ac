"""train_check.py with fp16 allowed on CPU ranks.

    deepspeed --num_gpus 2 tests/helpers/fp16_on_cpu.py sft REPORT.json -- <launcher flags> --precision fp16

DeepSpeed's CPU accelerator reports fp16 as unsupported on CPUs without AVX512-FP16 (oneDNN's fp16 kernels), and
its engine then refuses fp16. This helper overrides that one answer, nothing else: DeepSpeed's real fp16 ZeRO
optimizer and dynamic loss scaler run, on torch's generic CPU fp16 kernels. It is not a GPU run (no tensor
cores, and the CPU "peak" it measures for MFU is meaningless), but it exercises the fp16 path with frozen layers:
overflow detection, skipped steps, loss-scale backoff, 16-bit saves.
"""
from deepspeed.accelerator import get_accelerator

import train_check

get_accelerator().is_fp16_supported = lambda: True

if __name__ == "__main__":
    train_check.main()
    train_check.engine.exit_process(0)
