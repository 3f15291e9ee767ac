"""The one command: ``lvlm-region <command>`` (setup.py's console script) and ``python -m lvlm_region <command>``.

Each command is a module here: its docstring is its ``--help`` description, ``parser()`` builds its flags from
declared settings (RunConfig's fields, or the command's own settings dataclass, each a config.setting) and
``main(argv)`` runs it and returns the exit status. launch/*.py and data_prep/*.py call the same ``main``.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one line for `lvlm-region --help`, whether its ranks join a DeepSpeed process group)
COMMANDS = {
    "pretrain": ("pretrain", "stage 1: train only the projector, on image-caption pairs", True),
    "sft": ("sft", "stage 2: train the projector and a region of the LLM's layers (default uniform25)", True),
    "evaluate": ("evaluate", "held-out loss, answer accuracy and text retention of a model directory", True),
    "compare": ("compare", "stage 2 once per region and seed, then one report (accuracy, GPU-hours vs full)", False),
    "importance": ("importance", "score every decoder layer (block influence or weight change)", True),
    "prune": ("prune", "drop the lowest-scoring layers outside the visual region, evaluate, time", True),
    "plan": ("plan", "memory per GPU and GPU-hours of every ZeRO / offload / batch choice, from config.json", False),
    "prepare": ("prepare", "validate, render and tokenize a data set once into a `datasets` directory", False),
    "report": ("report", "the cost report from run directories: GPU-hours saved against full tuning", False),
    "demo": ("demo", "both stages on the embedded tiny model and generated data (CPU is enough)", False),
}


def module(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")


def parser(name: str):
    """Command ``name``'s argument parser (what its --help prints)."""
    return module(name).parser()


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lvlm-region <command> [flags]   (or: python -m lvlm_region <command> [flags])", "",
             "Two-stage LLaVA-style training that tunes a region of the LLM's layers. Commands:", ""]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line, _) in COMMANDS.items()]
    lines += ["", "lvlm-region <command> --help shows a command's flags; every command takes --config FILE (YAML or "
              "JSON, keys are flag names; a run's run.json reruns it)."]
    return "\n".join(lines)


def split_local_rank(argv: list[str]) -> tuple[list[str], list[str]]:
    """deepspeed --module puts --local_rank=N before the command (python -m lvlm_region --local_rank=0 sft ...):
    (argv without it, it as a flag for the command)."""
    rest, local = [], []
    args = iter(argv)
    for a in args:
        if a.startswith("--local_rank="):
            local.append(a)
        elif a == "--local_rank":
            local.append(f"--local_rank={next(args, '0')}")
        else:
            rest.append(a)
    return rest, local


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default sys.argv[1:]) to its command; a training command's ranks leave their process
    group cleanly afterwards (engine.exit_process)."""
    argv, local = split_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        print(f"error: unknown command {name!r}" + (f"; did you mean {near[0]!r}?" if near else "") + "\n\n" + usage(),
              file=sys.stderr)
        return 2
    distributed = COMMANDS[name][2]
    sys.argv[0] = f"lvlm-region {name}"  # argparse's prog: the usage line names the command, however it was started
    code = module(name).main(rest + (local if distributed else []))
    if distributed:
        from ..train.engine import exit_process
        exit_process(code)
    return code


def entry() -> None:
    """The console script."""
    sys.exit(main())
