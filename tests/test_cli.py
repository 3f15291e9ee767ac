"""Flags: every numeric flag is refused at parse time outside its domain, with the valid range; the run config
refuses the same values when built in code."""
import dataclasses
import math
import re
import sys

import pytest

from conftest import run
from lvlm_region.train.cli import build_parser, parse
from lvlm_region.config import RANGES, RunConfig


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--lr", "0", "--lr must be a finite number > 0, got 0.0"),
    ("--projector-lr", "-1e-5", "--projector-lr must be a finite number > 0, got -1e-05"),
    ("--grad-clip", "-1", "--grad-clip must be a finite number >= 0, got -1.0"),
    ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0, got -0.1"),
    ("--eval-max-samples", "-1", "--eval-max-samples must be a whole number >= 0, got -1"),
    ("--micro-batch", "0", "--micro-batch must be a whole number >= 1, got 0"),
    ("--micro-batch", "1.5", "--micro-batch must be a whole number >= 1, got '1.5'"),
    ("--warmup-ratio", "1", "--warmup-ratio must be a finite number in [0, 1), got 1.0"),
    ("--epochs", "0", "--epochs must be a finite number > 0, got 0.0"),
    ("--seed", "-1", "--seed must be a whole number in [0, 4.29497e+09], got -1"),
    ("--lora-dropout", "1", "--lora-dropout must be a finite number in [0, 1), got 1.0"),
    ("--lora-alpha", "0", "--lora-alpha must be a whole number > 0, got 0"),
    ("--max-bad-fraction", "2", "--max-bad-fraction must be a finite number in [0, 1], got 2.0"),
    ("--save-every", "-2", "--save-every must be a whole number >= 0, got -2"),
    ("--keep-checkpoints", "-1", "--keep-checkpoints must be a whole number >= 0, got -1"),
    ("--zero", "1", "--zero must be a whole number in [2, 3], got 1"),
    ("--peak-tflops", "-5", "--peak-tflops must be a finite number > 0, got -5.0"),
    ("--dist-timeout", "0", "--dist-timeout must be a finite number > 0, got 0.0"),
    ("--prep-timeout", "inf", "--prep-timeout must be a finite number > 0, got inf"),
    ("--num-workers", "-1", "--num-workers must be a whole number >= 0, got -1"),
])
def test_numeric_flags_out_of_their_domain_are_refused_at_parse_time(capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        parse("sft", "", ["--output-dir", "out", f"{flag}={value}"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_every_numeric_field_has_a_ranged_flag_and_the_config_checks_the_same_range():
    parser = build_parser("sft", "")
    typed = {a.dest: a.type for a in parser._actions if a.type is not None and a.dest not in ("local_rank", "dry_run")}
    assert set(typed) == set(RANGES)
    numeric = {f.name for f in dataclasses.fields(RunConfig) if f.type in ("int", "float", "int | None",
                                                                          "float | None")}
    assert numeric == set(RANGES)
    for name, valid in RANGES.items():
        bad = math.nan if valid.kind is float else valid.low - 1
        cfg = RunConfig(stage="sft", output_dir="out", **{name: bad})
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be"):
            cfg.resolve()


def test_other_launchers_refuse_numbers_out_of_range(tmp_path):
    res = run([sys.executable, "launch/report.py", str(tmp_path), "--output", str(tmp_path / "r"),
               "--assumed-mfu", "0"], timeout=120)
    assert res.returncode == 2 and "--assumed-mfu must be a finite number in (0, 1], got 0.0" in res.stderr
    res = run([sys.executable, "data_prep/prepare.py", "--data", "x.json", "--model", "m", "--output",
               str(tmp_path / "p"), "--max-length", "0"], timeout=120)
    assert res.returncode == 2 and "--max-length must be a whole number >= 1, got 0" in res.stderr


def test_every_field_has_its_flag_with_the_dataclass_default():
    parser = build_parser("sft", "")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "local_rank", "config", "dry_run")}
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    # the stage is the launcher's own; explicit (the flags given) is what the parser records, sources what resolve
    # found: not flags
    assert set(actions) == {n for n, f in fields.items() if f.metadata.get("flag", True)} == set(fields) - {
        "stage", "explicit", "sources"}
    for name, a in actions.items():
        assert a.default == fields[name].default, name
        assert a.help and a.option_strings == [f"--{name.replace('_', '-')}"] + (
            [f"--no-{name.replace('_', '-')}"] if a.nargs == 0 and "--no-" + name.replace("_", "-") in
            a.option_strings else [])


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_every_help_default_is_the_one_resolve_applies(tmp_path, stage):
    """The help of each flag states the default; resolve() on a config without the flag gives exactly that."""
    helps = {a.dest: a.help for a in build_parser(stage, "")._actions}
    demo = RunConfig(stage=stage, output_dir=str(tmp_path / "o")).resolve()

    def shown(v) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)
    for f in dataclasses.fields(RunConfig):
        if not f.metadata.get("flag", True):  # stage, explicit
            continue
        if f.metadata.get("stages"):
            want = f.metadata["stages"][stage]
            assert getattr(demo, f.name) == want
            assert f"(default: {shown(want)} for stage {1 if stage == 'pretrain' else 2})" in helps[f.name]
        elif f.default is not None:
            assert helps[f.name].endswith(f"(default: {shown(f.default)})"), f.name
            assert getattr(demo, f.name) == f.default or f.name in ("data", "eval_data")
    # The computed defaults: learning rates per stage, model and tuner, and the aspect ratio per family.
    for tuner in ("full", "lora"):
        d = RunConfig(stage=stage, output_dir="o", tuner=tuner).resolve()
        m = RunConfig(stage=stage, output_dir="o", tuner=tuner, model=str(tmp_path), data="d.json").resolve()
        for cfg, on_demo in ((d, True), (m, False)):
            lr = {("pretrain", False): 1e-3, ("sft", False): 2e-4 if tuner == "lora" else 2e-5,
                  ("pretrain", True): 1e-2, ("sft", True): 1e-2 if tuner == "lora" else 2e-3}[stage, on_demo]
            assert cfg.lr == lr and f"{lr:g}" in helps["lr"]
            want = (1e-3 if on_demo else 2e-5) if tuner == "lora" else lr
            assert cfg.projector_lr == want and f"{want:g}" in helps["projector_lr"] + helps["lr"]
    own = RunConfig(stage=stage, output_dir="o", model=str(tmp_path), data="d.json").resolve()
    assert own.epochs == 1.0 and helps["epochs"].endswith("(default: 1 for both stages; on the demo model stage 1 "
                                                          "4, stage 2 1)")
    assert demo.epochs == (4.0 if stage == "pretrain" else 1.0)
    name = "stage 1" if stage == "pretrain" else "stage 2"
    part = next(p for p in helps["image_aspect_ratio"].split("; ") if name in p)
    for model_type, aspect in (("llava", "square" if stage == "pretrain" else "pad"), ("qwen2_vl", "square")):
        (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
        cfg = RunConfig(stage=stage, output_dir="o", model=str(tmp_path), data="d.json").resolve()
        assert cfg.image_aspect_ratio == aspect
        assert re.search(rf"{aspect} \([^)]*\b{model_type}\b", part), (part, model_type)


def test_the_flags_given_are_recorded_even_at_their_default_value():
    """--plan auto keeps what the user gave: a flag given at its default value counts as given."""
    cfg = parse("sft", "", ["--output-dir", "o", "--micro-batch", "16", "--no-group-by-length"])
    assert cfg.explicit == ("group_by_length", "micro_batch", "output_dir")
    assert cfg.given("micro_batch") and not cfg.given("zero") and not cfg.given("grad_ckpt")
    assert RunConfig(stage="sft", output_dir="o", zero=3).given("zero")  # built in code: set to a non-default
