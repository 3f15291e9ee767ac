"""Command-line flags shared by the launchers: they map one to one onto RunConfig fields."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from .config import RANGES, Range, RunConfig, flag
from .regions import VALID_FORMS


def number(name: str, valid: Range | None = None):
    """argparse type of the flag of field ``name``: its Range (``valid``, default config.RANGES[name]) refuses a value
    outside it at parse time, naming the flag and the valid range."""
    valid = valid or RANGES[name]

    def parse(text: str):
        try:
            return valid.parse(flag(name), text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = valid.kind.__name__  # what argparse names in its own messages
    return parse


STAGE_NAMES = {"pretrain": "stage 1", "sft": "stage 2"}


def _shown(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def help_text(f: dataclasses.Field, stage: str) -> str:
    """A field's help with the default resolve() applies in ``stage``."""
    meta = f.metadata
    if meta.get("stages"):
        default = f"{_shown(meta['stages'][stage])} for {STAGE_NAMES[stage]}"
    elif meta.get("default_help"):
        default = meta["default_help"]
    elif f.default is not None:
        default = _shown(f.default)
    else:
        default = None
    text = meta["help"] + (f"; {VALID_FORMS}" if f.name == "region" else "")
    return f"{text} (default: {default})" if default is not None else text


def field_help(name: str, stage: str = "sft") -> str:
    """The help of RunConfig field ``name`` (for tools that take the same setting, e.g. data_prep/prepare.py)."""
    return help_text(next(f for f in dataclasses.fields(RunConfig) if f.name == name), stage)


def build_parser(stage: str, doc: str) -> argparse.ArgumentParser:
    """One flag per RunConfig field (except stage, the launcher's own): its help, default and, for numbers, its
    Range come from the field (config.setting), so flag and config cannot drift apart."""
    # No abbreviations: a mistyped flag (--regio) is refused, never silently taken for another (--region).
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_flags(p, stage)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    return p


def add_flags(p: argparse.ArgumentParser, stage: str, names: tuple[str, ...] | None = None,
              unset: dict[str, str] | None = None) -> None:
    """The flags of RunConfig fields ``names`` (default: all but stage). ``unset``: fields whose flag defaults to
    None (the caller fills them) -> what the help says the default is."""
    unset = unset or {}
    for f in dataclasses.fields(RunConfig):
        if not f.metadata.get("flag", True) or (names is not None and f.name not in names):
            continue
        kw = {"help": help_text(f, stage), "default": f.default}
        if f.name in unset:
            kw.update(default=None, help=f"{f.metadata['help']} (default: {unset[f.name]})")
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif f.type == "bool | None":
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name in RANGES:
            kw["type"] = number(f.name)
        if f.name == "output_dir" and "output_dir" not in unset:
            kw["required"] = True
        p.add_argument(flag(f.name), **kw)


def parse(stage: str, doc: str, argv: list[str] | None = None) -> RunConfig:
    parser = build_parser(stage, doc)
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for action in parser._actions:  # parsed again without defaults: what remains was given on the command line
        action.default = argparse.SUPPRESS
        action.required = False
    given = set(vars(parser.parse_args(argv))) & fields
    return RunConfig(stage=stage, explicit=tuple(sorted(given)), **{k: v for k, v in args.items() if k in fields})


def main(stage: str, doc: str, argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    from .trainer import TrainingDiverged, train_and_compare  # after logging is set up; heavy imports

    cfg = parse(stage, doc, argv)
    try:
        result = train_and_compare(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a checkpoint that could not be written (disk full, quota)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    s = result.summary
    if result.nothing_to_do:
        if os.environ.get("RANK", "0") == "0":
            print(f"{cfg.output_dir}: already complete, nothing to do (run.json status complete, "
                  f"{s.get('steps_done')} steps)")
        return 0
    if s["status"] == "interrupted" and os.environ.get("RANK", "0") == "0":
        print(f"stopped at step {s['steps_done']} ({s['stop_reason']}); checkpoint {s['checkpoint']}; "
              f"continue with the same command plus --resume auto")
    if s.get("eval") and os.environ.get("RANK", "0") == "0":
        print(f"held-out answer accuracy {s['eval']['accuracy']:.3f} ({s['eval']['correct']}/{s['eval']['samples']})")
    return 0
