"""The command line from declared settings: every command's flags (one per RunConfig field or per field of a
command's settings dataclass, each a config.setting), --config recipe files and run.json reruns, --dry-run, and the
training commands' main (lvlm-region pretrain / sft, launch/pretrain.py, launch/sft.py)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass

from ..config import AT_LEAST_1, RANGES, Range, RunConfig, flag, setting
from ..model.regions import VALID_FORMS


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


CONFIG_HELP = ("a recipe: a YAML or JSON file of flag values (keys are flag names, lora-r or lora_r); flags on the "
               "command line win; a finished run's run.json reruns it")


@dataclass
class TrainCommand:
    """The training commands' settings besides RunConfig's (never saved in run.json)."""

    dry_run: int | None = setting(None, "resolve the run (region, template, batch arithmetic, DeepSpeed config), print "
                                        "it and exit: prepares nothing and loads no weights; RANKS: the ranks to plan "
                                        "for (default: WORLD_SIZE, else 1)", nargs="?", const=0, metavar="RANKS",
                                  valid=AT_LEAST_1)


def command_parser(doc: str, ranks: bool = False) -> argparse.ArgumentParser:
    """A command's parser: its docstring as description, no abbreviations (a mistyped --regio is refused, never
    taken for --region) and --config. ``ranks``: a command DeepSpeed's launcher starts (its --local_rank)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    if ranks:
        p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def build_parser(stage: str, doc: str) -> argparse.ArgumentParser:
    """One flag per RunConfig field (except stage, the launcher's own): its help, default and, for numbers, its
    Range come from the field (config.setting), so flag and config cannot drift apart."""
    p = command_parser(doc, ranks=True)
    add_flags(p, stage)
    add_flags(p, stage, settings=TrainCommand)
    return p


def add_flags(p: argparse.ArgumentParser, stage: str = "sft", names: tuple[str, ...] | None = None,
              unset: dict[str, str] | None = None, settings: type = RunConfig) -> None:
    """The flags of the fields ``names`` (default: all with a flag) of ``settings`` (RunConfig or a command's
    settings dataclass, each field a config.setting). ``unset``: fields whose flag defaults to None (the caller
    fills them) -> what the help says the default is."""
    unset = unset or {}
    for f in dataclasses.fields(settings):
        meta = f.metadata
        if not meta.get("flag", True) or (names is not None and f.name not in names):
            continue
        kw = {"help": help_text(f, stage), "default": f.default}
        if f.name in unset:
            kw.update(default=None, help=f"{meta['help']} (default: {unset[f.name]})")
        for key in ("metavar", "choices", "nargs", "const"):
            if meta.get(key) is not None:
                kw[key] = meta[key]
        valid = meta.get("valid") or (RANGES.get(f.name) if settings is RunConfig else None)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif kind == "bool | None":
            kw["action"] = argparse.BooleanOptionalAction
        elif valid is not None:
            kw["type"] = number(meta.get("same_as") or f.name, valid)
        elif kind.startswith(("int", "float")):
            kw["type"] = int if kind.startswith("int") else float
        if meta.get("positional"):  # no default: argparse requires it (--config may give it: apply_config)
            del kw["default"]
            p.add_argument(f.name, **kw)
            continue
        if meta.get("required") or (f.name == "output_dir" and settings is RunConfig and "output_dir" not in unset):
            kw["required"] = True
        p.add_argument(flag(f.name), **kw)


def config_path(argv: list[str] | None) -> str | None:
    """The --config FILE among ``argv``, read before the command's own parse (its values become the defaults)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    return pre.parse_known_args(argv)[0].config


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, stage: str | None = None):
    """``parser``'s values with --config's file under the command line: (values by dest, the dests given on the
    command line or in the file); --config and --local_rank are not among them. A run.json's config is a valid file
    (``stage``: the command's stage, which it must match)."""
    path = config_path(argv)
    from_file = apply_config_file(parser, path, stage) if path else {}
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if k not in ("config", "local_rank")}
    for action in parser._actions:  # parsed again without defaults: what remains was given on the command line
        action.default = argparse.SUPPRESS
        action.required = False
    typed = set(vars(parser.parse_known_args(argv)[0]))
    given = (typed | set(from_file)) - {"config", "local_rank"}
    return values, given


# run.json's config fields that are no flag: the stage is the command's, explicit what was typed, sources what
# resolve found (the hub ids' snapshots are the --model / --llm / --vision values themselves)
RUN_ONLY = ("stage", "explicit", "sources")


def read_config_file(path: str, stage: str | None = None) -> dict:
    """--config FILE's values by key: a YAML (.yaml, .yml) or JSON (.json) mapping, or a run.json (its config)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file; give a YAML or JSON recipe or a run's run.json")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            data = yaml.safe_load(text)
        elif path.endswith(".json"):
            data = json.loads(text)
        else:
            raise ValueError(f"--config {path}: not a .yaml, .yml or .json file")
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {path} does not parse: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} holds a {type(data).__name__}, not a mapping of flag names to values")
    if isinstance(data.get("config"), dict) and "status" in data:  # a run's run.json: its resolved config
        run = data["config"]
        if stage is not None and run.get("stage") != stage:
            raise ValueError(f"--config {path} is the run.json of a {run.get('stage')} run; rerun it with "
                             f"`lvlm-region {run.get('stage')} --config {path}`")
        data = {k: v for k, v in run.items() if k not in RUN_ONLY}
        for name, where in (run.get("sources") or {}).items():  # a hub id again, not the cache directory it gave
            if where.get("id"):
                data[name] = where["id"]
    return data


def apply_config_file(parser: argparse.ArgumentParser, path: str, stage: str | None = None) -> dict:
    """--config's values as ``parser``'s defaults (so the command line wins), each checked as its flag would be;
    returns them by dest. An unknown key is refused, naming the nearest flag."""
    return apply_config(parser, read_config_file(path, stage), f"--config {path}")


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "local_rank")}


def config_dest(key) -> str:
    return str(key).removeprefix("--").replace("-", "_")


def unknown_key(key, known, where: str) -> ValueError:
    import difflib

    near = difflib.get_close_matches(config_dest(key), list(known), n=1)
    hint = f"; did you mean {flag(near[0]).removeprefix('--')!r}?" if near else ""
    return ValueError(f"{where}: unknown key {key!r}{hint} (keys are the command's flag names; see --help)")


def apply_config(parser: argparse.ArgumentParser, data: dict, where: str) -> dict:
    actions = flag_actions(parser)
    values = {}
    for key, value in data.items():
        dest = config_dest(key)
        if dest not in actions:
            raise unknown_key(key, actions, where)
        values[dest] = config_value(actions[dest], value, f"{where}: {key}")
    for dest in values:
        actions[dest].required = False
        if not actions[dest].option_strings and actions[dest].nargs == "+":  # a positional the file gave
            actions[dest].nargs = "*"
    parser.set_defaults(**values)
    return values


def config_argv(parser: argparse.ArgumentParser, data: dict, where: str) -> list[str]:
    """``data`` (flag names -> values, each checked as ``parser`` would) as command-line arguments for it."""
    actions, out = flag_actions(parser), []
    for key, value in data.items():
        dest = config_dest(key)
        if dest not in actions:
            raise unknown_key(key, actions, where)
        action, value = actions[dest], config_value(actions[dest], value, f"{where}: {key}")
        if isinstance(value, bool):
            out += [flag(dest)] if value else ([f"--no-{dest.replace('_', '-')}"] if isinstance(
                action, argparse.BooleanOptionalAction) else [])
        elif value is not None:
            out += [flag(dest), *map(str, value if isinstance(value, list) else [value])]
    return out


def config_value(action: argparse.Action, value, where: str):
    """A --config value as its flag would parse it: a bool for on/off flags, a list for several values, else its
    text through the flag's type (ranges and kinds checked) and choices."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [config_value(_one(action), v, where) for v in items]
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where} takes one value, got {value!r}")
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, bool) else str(value)
    try:
        out = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if action.choices is not None and out not in action.choices:
        raise ValueError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return out


def _one(action: argparse.Action) -> argparse.Action:
    return argparse.Action(action.option_strings, action.dest, type=action.type, choices=action.choices)


def command_values(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """A command's flag values (parse_args); a bad --config file exits with status 2, as a bad flag does."""
    try:
        return parse_args(parser, argv)[0]
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stdout(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stdout)


def parse(stage: str, doc: str, argv: list[str] | None = None) -> RunConfig:
    return config_of(stage, *parse_args(build_parser(stage, doc), argv, stage))


def config_of(stage: str, values: dict, given: set[str]) -> RunConfig:
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(stage=stage, explicit=tuple(sorted(given & fields)),
                     **{k: v for k, v in values.items() if k in fields})


def main(stage: str, doc: str, argv: list[str] | None = None) -> int:
    log_to_stdout()
    try:
        values, given = parse_args(build_parser(stage, doc), argv, stage)
    except (ValueError, FileNotFoundError) as e:  # --config's file
        print(f"error: {e}", file=sys.stderr)
        return 2
    dry = values.pop("dry_run")
    cfg = config_of(stage, values, given)
    if dry is not None:
        return print_dry_run(cfg, dry or int(os.environ.get("WORLD_SIZE", "1")))
    from .trainer import TrainingDiverged, train_and_compare

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


def print_dry_run(cfg: RunConfig, ranks: int) -> int:
    """--dry-run: the resolved run, printed; nothing prepared, no weights loaded."""
    from .run_setup import dry_run

    try:
        plan = dry_run(cfg, ranks)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    region = plan["region"]
    print(f"dry run of {cfg.stage} (nothing prepared, no weights loaded)")
    print(f"model:      {plan['model']} ({plan['model_type']}, {plan['decoder_layers']} decoder layers)")
    parts = ", ".join(p for p, on in region["parts"].items() if on) or "no other part"
    print(f"region:     {region['spec']}: layers {region['layers']} ({len(region['layers'])} of "
          f"{plan['decoder_layers']}), also trains {parts}; tuner {plan['tuner']}")
    moving = plan.get("region_schedule")
    if moving:
        print(f"moving:     --region-schedule {moving['schedule']} over layers {moving['candidates']}: "
              + "; ".join(f"steps {p['first_step']}-{p['last_step']} layers {p['layers']}"
                          for p in moving["first_periods"]) + "; ... (Adam state reset at each switch)")
    if plan["total_parameters"]:
        print(f"trainable:  {plan['trainable_parameters']:,} of {plan['total_parameters']:,} parameters"
              + (" (per period)" if moving else ""))
    print(f"template:   {plan['template']}; image aspect {plan['image_aspect_ratio']}; max length "
          f"{plan['max_length']}")
    print(f"batch:      global {plan['global_batch']} = micro-batch {plan['micro_batch']} x accumulation "
          f"{plan['grad_accum']} x {plan['ranks']} ranks")
    print(f"schedule:   lr {plan['lr']:g} (projector {plan['projector_lr']:g}), "
          + (f"{plan['max_steps']} steps" if plan["max_steps"] else f"{plan['epochs']:g} epochs"))
    print(f"precision:  {plan['precision']}; plan {plan['plan']}")
    for flag_name, path in plan["missing_here"].items():
        print(f"not here:   {flag_name} {path}")
    print("deepspeed:  " + json.dumps(plan["ds_config"], sort_keys=True))
    return 0
