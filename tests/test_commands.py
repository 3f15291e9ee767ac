"""One command (`lvlm-region <command>`, `python -m lvlm_region <command>`), flags from declared settings only,
--config recipes and run.json reruns, --dry-run, models by hub id (offline, from a cache the test writes)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run

from lvlm_region.train import cli, plan
from lvlm_region import commands, config
from lvlm_region.commands import compare as compare_cmd
from lvlm_region.commands import demo as demo_cmd
from lvlm_region.commands import importance as importance_cmd
from lvlm_region.commands import plan as plan_cmd
from lvlm_region.commands import prepare as prepare_cmd
from lvlm_region.commands import prune as prune_cmd
from lvlm_region.commands import report as report_cmd

CONFIGS = ROOT / "docs" / "configs"
RECIPES = ROOT / "recipes"
# Each command's declarations, in the order a flag's name is looked up (the first that declares it owns it)
DECLARED = {
    "pretrain": (config.RunConfig, cli.TrainCommand), "sft": (config.RunConfig, cli.TrainCommand),
    "evaluate": (config.RunConfig,), "importance": (importance_cmd.Settings, config.RunConfig),
    "prune": (prune_cmd.Settings, config.RunConfig), "plan": (plan.Setting, plan_cmd.Settings),
    "prepare": (prepare_cmd.Settings, config.RunConfig), "compare": (compare_cmd.Settings,),
    "report": (report_cmd.Settings,), "demo": (demo_cmd.Settings,)}
# A command's own setting named like a RunConfig field but meaning something else (so declared, not same_as)
OWN_MEANING = {
    ("prune", "model"): "the model to prune (a trained one), not the one to train",
    ("prune", "eval_data"): "switches on the evaluation of every pruned model and the pruning report",
    ("plan", "data"): "a prepared directory whose length and image statistics are read, not trained on",
    ("prepare", "stage"): "the stage whose defaults the data is prepared with (the training commands are the stage)",
    ("prepare", "data"): "the raw data to prepare, never the prepared directory or the demo default",
    ("prepare", "model"): "whose tokenizer and layout prepare the data",
    ("plan", "model"): "only config.json is read",
    ("plan", "gpu_memory_gb"): "overrides the GPU table; training's is --plan auto's budget",
    ("plan", "peak_tflops"): "overrides the GPU table; training's is MFU's denominator",
    ("plan", "precision"): "no auto: the plan is for a GPU",
    ("plan", "global_batch"): "a default (128) where training derives it from the flags",
    ("compare", "output_dir"): "the comparison's directory, not a run's",
    ("demo", "output_dir"): "the parent of the two stages' run directories",
}


def test_help_lists_every_command_and_the_console_script_runs(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lvlm_region", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0
    for name, (_, line, _) in commands.COMMANDS.items():
        assert f"  {name:<10}  {line}" in res.stdout
    assert set(commands.COMMANDS) == {"pretrain", "sft", "evaluate", "compare", "importance", "prune", "plan",
                                      "prepare", "report", "demo"}
    script = shutil.which("lvlm-region", path=os.path.dirname(sys.executable))
    assert script, "setup.py's console script is not installed beside this Python"
    res = subprocess.run([script, "trian"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "unknown command 'trian'" in res.stderr and "  sft " in res.stderr
    res = subprocess.run([script, "prepair"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "unknown command 'prepair'; did you mean 'prepare'?" in res.stderr


def test_a_script_and_its_command_print_the_same_help():
    for script, name in (("launch/sft.py", "sft"), ("data_prep/prepare.py", "prepare"), ("launch/plan.py", "plan")):
        by_script = run([sys.executable, script, "--help"], timeout=120)
        by_module = subprocess.run([sys.executable, "-m", "lvlm_region", name, "--help"], capture_output=True,
                                   text=True, cwd=ROOT, timeout=120)
        assert by_script.returncode == by_module.returncode == 0
        assert by_script.stdout == by_module.stdout
        assert by_module.stdout.startswith(f"usage: lvlm-region {name} ")
    assert "--prep-workers" in by_module.stdout or name != "prepare"


@pytest.mark.parametrize("name", list(DECLARED))
def test_every_flag_of_every_command_is_a_declared_setting_with_its_default(name):
    """No flag, default or help is written outside a declaration (config.setting / same_as)."""
    parser = commands.parser(name)
    classes = DECLARED[name]
    fields = {}
    for cls in reversed(classes):
        fields.update({f.name: (cls, f) for f in dataclasses.fields(cls) if f.metadata.get("flag", True)})
    for action in parser._actions:
        if action.dest in ("help", "config", "local_rank"):
            continue
        assert action.dest in fields, f"{name}: --{action.dest} is not a declared setting"
        cls, f = fields[action.dest]
        assert action.help.startswith(f.metadata["help"]), (name, action.dest)
        if action.default is not None:  # None: the command fills it (its help says from where)
            assert action.default == f.default, (name, action.dest)
        if f.metadata.get("same_as"):  # shared with training: the same default, help and range
            run_field = next(g for g in dataclasses.fields(config.RunConfig) if g.name == f.metadata["same_as"])
            assert f.metadata["help"] == run_field.metadata["help"]
            assert f.default == config.default(run_field.name)
        elif cls is not config.RunConfig and action.dest in {g.name for g in dataclasses.fields(config.RunConfig)}:
            assert (name, action.dest) in OWN_MEANING, f"{name} re-declares RunConfig's {action.dest}: use same_as"


def test_no_help_text_is_declared_twice():
    helps = {}
    for classes in DECLARED.values():
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.metadata.get("help") and not f.metadata.get("same_as"):
                    helps.setdefault(f.metadata["help"], set()).add(f"{cls.__module__}.{cls.__name__}.{f.name}")
    assert {h: s for h, s in helps.items() if len(s) > 1} == {}


def test_planner_defaults_are_trainings():
    s = plan.Setting(model="m")
    assert (s.region, s.tuner, s.lora_r, s.lora_alpha, s.lora_dropout) == (
        "uniform25", "full", config.RunConfig.lora_r, config.RunConfig.lora_alpha, config.RunConfig.lora_dropout)
    assert config.default("template", "pretrain") == "plain" and config.default("template", "sft") == "auto"


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if path.suffix == ".yaml" else json.dumps(data))
    return str(path)


def test_a_recipe_sets_flags_the_command_line_wins_and_both_count_as_given(tmp_path):
    f = write(tmp_path / "r.yaml", {"region": "first25", "lora-r": 16, "lr": "3e-5", "group_by_length": False,
                                    "output-dir": "o1", "report-to": "csv"})
    cfg = cli.parse("sft", "", ["--config", f, "--region", "last25"])
    assert (cfg.region, cfg.lora_r, cfg.lr, cfg.group_by_length, cfg.output_dir, cfg.report_to) == (
        "last25", 16, 3e-5, False, "o1", "csv")
    assert {"region", "lora_r", "lr", "group_by_length", "output_dir", "report_to"} <= set(cfg.explicit)
    cfg = cli.parse("sft", "", ["--config", write(tmp_path / "r.json", {"output_dir": "o2", "zero": 3})])
    assert (cfg.output_dir, cfg.zero, cfg.region) == ("o2", 3, None)


@pytest.mark.parametrize("data,message", [
    ({"lora_rank": 8}, "unknown key 'lora_rank'; did you mean 'lora-r'?"),
    ({"regoin": "full"}, "unknown key 'regoin'; did you mean 'region'?"),
    ({"zero": 1}, "zero: --zero must be a whole number in [2, 3], got 1"),
    ({"micro-batch": 2.5}, "micro-batch: --micro-batch must be a whole number >= 1, got '2.5'"),
    ({"packing": "yes"}, "packing must be true or false, got 'yes'"),
    ({"region": ["full"]}, "region takes one value, got ['full']"),
])
def test_a_bad_recipe_is_refused_naming_the_key(tmp_path, data, message):
    f = write(tmp_path / "r.yaml", {"output-dir": "o", **data})
    with pytest.raises(ValueError) as e:
        cli.parse("sft", "", ["--config", f])
    assert f"--config {f}: " in str(e.value) and message in str(e.value)


def test_config_files_of_other_commands(tmp_path):
    # report: the positional run directories from the file
    values, given = cli.parse_args(report_cmd.parser(), ["--config", write(tmp_path / "r.yaml", {
        "runs": ["a", "b"], "output": "rep", "project-gpu": "H100"})])
    assert (values["runs"], values["output"], values["project_gpu"]) == (["a", "b"], "rep", "H100")
    with pytest.raises(ValueError, match="project-gpu must be one of A100"):
        cli.parse_args(report_cmd.parser(), ["--config", write(tmp_path / "b.yaml", {"runs": ["a"], "output": "r",
                                                                                     "project-gpu": "TPU"})])
    # compare: its own keys, and the arms' (launch/sft.py flags) before the command line's pass-through
    p = compare_cmd.parser()
    arms = compare_cmd.split_config(p, ["--config", write(tmp_path / "c.yaml", {
        "regions": "full,uniform25", "seeds": "0,1", "output-dir": "cmp", "lr": 1e-3, "grad-ckpt": True,
        "max-steps": 4}), "--max-steps", "2"])
    args, rest = p.parse_known_args(["--config", str(tmp_path / "c.yaml"), "--max-steps", "2"])
    assert (args.regions, args.seeds, args.output_dir) == ("full,uniform25", "0,1", "cmp")
    assert arms == ["--lr", "0.001", "--grad-ckpt", "--max-steps", "4"] and rest == ["--max-steps", "2"]
    with pytest.raises(ValueError, match="unknown key 'lora-rank'; did you mean 'lora-r'"):
        compare_cmd.split_config(compare_cmd.parser(), ["--config", write(tmp_path / "d.yaml", {
            "regions": "full", "output-dir": "o", "lora-rank": 4})])


def test_a_run_json_of_the_other_stage_is_refused(tmp_path):
    f = write(tmp_path / "run.json", {"status": "complete", "config": {"stage": "pretrain", "output_dir": "x"}})
    with pytest.raises(ValueError, match=r"is the run.json of a pretrain run; rerun it with `lvlm-region pretrain "):
        cli.parse("sft", "", ["--config", f])
    assert cli.parse("pretrain", "", ["--config", f]).output_dir == "x"


def hub_cache(root: Path, repos: dict[str, Path]) -> dict:
    """A Hugging Face cache holding ``repos`` (id -> directory copied as its snapshot), as huggingface_hub lays it
    out; the environment that serves it offline."""
    for repo_id, src in repos.items():
        repo = root / ("models--" + repo_id.replace("/", "--"))
        commit = f"{abs(hash(repo_id)):040x}"[-40:]
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(src, repo / "snapshots" / commit)
    return {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def recipe_hub(tmp_path_factory):
    """The recipes' hub ids served offline from the configs in docs/configs (config.json only: nothing else is
    read by a dry run)."""
    return hub_cache(tmp_path_factory.mktemp("hub"), {
        "lmsys/vicuna-7b-v1.5": CONFIGS / "vicuna-7b-v1.5",
        "openai/clip-vit-large-patch14-336": CONFIGS / "clip-vit-large-patch14-336",
        "Qwen/Qwen2.5-VL-7B-Instruct": CONFIGS / "qwen2.5-vl-7b-instruct"})


@pytest.mark.parametrize("recipe,ranks,extra,expect", [
    ("llava-1.5-7b-pretrain.yaml", 8, [], [
        "model:      lmsys/vicuna-7b-v1.5 + openai/clip-vit-large-patch14-336 (assembled) (llava, 32 decoder layers)",
        "region:     none: layers [] (0 of 32), also trains projector", "template:   plain",
        "batch:      global 256 = micro-batch 32 x accumulation 1 x 8 ranks",
        "trainable:  20,979,712 of 7,062,902,784 parameters", "template:   plain; image aspect square"]),
    ("llava-1.5-7b-sft-uniform25.yaml", 8, ["--model", str(CONFIGS / "llava-1.5-7b")], [
        "region:     uniform25: layers [0, 4, 9, 13, 18, 22, 27, 31] (8 of 32), also trains projector; tuner full",
        "trainable:  1,640,046,592 of 7,063,427,072 parameters", "template:   vicuna_v1; image aspect pad",
        "batch:      global 128 = micro-batch 16 x accumulation 1 x 8 ranks", '"stage": 3']),
    ("llava-1.5-7b-sft-uniform25-8node.yaml", 64, ["--model", str(CONFIGS / "llava-1.5-7b")], [
        "batch:      global 128 = micro-batch 2 x accumulation 1 x 64 ranks", '"train_batch_size": 128',
        '"train_micro_batch_size_per_gpu": 2']),
    ("qwen2.5-vl-7b-uniform25-lora.yaml", 8, [], [
        "model:      Qwen/Qwen2.5-VL-7B-Instruct (qwen2_5_vl, 28 decoder layers)",
        "region:     uniform25: layers [0, 5, 9, 14, 18, 23, 27] (7 of 28)",
        "tuner lora", "schedule:   lr 0.0002 (projector 2e-05)", "has no tokenizer_config.json here",
        "batch:      global 128 = micro-batch 8 x accumulation 2 x 8 ranks"]),
])
def test_recipes_resolve_with_dry_run(recipe_hub, tmp_path, recipe, ranks, extra, expect):
    stage = "pretrain" if "pretrain" in recipe else "sft"
    res = subprocess.run([sys.executable, "-m", "lvlm_region", stage, "--config", str(RECIPES / recipe), *extra,
                          "--output-dir", str(tmp_path / "out"), "--dry-run", str(ranks)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, **recipe_hub}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout.replace(str(recipe_hub["HF_HUB_CACHE"]), "CACHE")
    for line in expect:
        assert line in out, out
    assert "not here:   --data /data/llava/" in out
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_uncached_hub_id_is_refused_naming_it(tmp_path):
    env = hub_cache(tmp_path / "hub", {})
    res = subprocess.run([sys.executable, "-m", "lvlm_region", "plan", "--model", "nobody/nothing-7b"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=120)
    assert res.returncode == 2
    assert ("--model nobody/nothing-7b: not a local directory, and as a Hugging Face hub id it is not in the cache "
            f"({tmp_path / 'hub'}) and HF_HUB_OFFLINE=1 forbids fetching it") in res.stderr
    assert "hf download nobody/nothing-7b" in res.stderr


def test_deepspeed_module_form_reaches_the_command(tmp_path):
    """`deepspeed --module lvlm_region sft ...`: DeepSpeed's launcher puts --local_rank before the command."""
    res = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--module", "lvlm_region",
               "sft", "--output-dir", str(tmp_path / "o"), "--region", "first25", "--dry-run"], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "region:     first25: layers [0, 1] (2 of 8)" in res.stdout
    assert "global 16 = micro-batch 16 x accumulation 1 x 1 ranks" in res.stdout


def tensorboard_scalars(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def wandb_records(run_dir: Path):
    """The records of a wandb run file (.wandb: LevelDB-log framing of wandb's protobuf Records), read back."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = (next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, or middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def test_a_hub_model_trains_reports_to_every_tracker_and_reruns_from_its_run_json(demo_dir, demo_sft_data, tmp_path):
    """--model org/name from an offline cache; --report-to tensorboard,wandb,csv carry every number metrics.jsonl
    has; the run's run.json as --config reruns it to the same losses; a failing tracker only warns."""
    from conftest import deepspeed_cmd

    from lvlm_region.infra.tracking import scalars

    env = hub_cache(tmp_path / "hub", {"tiny/llava-demo": demo_dir / "base_model"})
    commit = (tmp_path / "hub" / "models--tiny--llava-demo" / "refs" / "main").read_text()
    out, again = tmp_path / "run", tmp_path / "again"
    res = run(deepspeed_cmd(1, "launch/sft.py", "--model", "tiny/llava-demo", *demo_sft_data, "--output-dir",
                            str(out), "--max-steps", "3", "--micro-batch", "4", "--num-workers", "0",
                            "--eval-max-samples", "6", "--log-every", "1", "--report-to", "tensorboard,wandb,csv"),
              env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    summary = json.loads((out / "run.json").read_text())
    snapshot = str(tmp_path / "hub" / "models--tiny--llava-demo" / "snapshots" / commit)
    assert summary["config"]["sources"]["model"] == {"id": "tiny/llava-demo", "revision": commit, "path": snapshot}
    assert summary["config"]["model"] == snapshot
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = {(name, r["step"]): v for r in records for name, v in scalars(r).items()}
    assert {("loss", 1), ("lr", 3), ("grad_norm", 2), ("tokens_per_s", 3), ("mfu", 1), ("forward_s", 1),
            ("eval/accuracy", 3), ("eval/loss", 3), ("text_eval/accuracy", 3)} <= set(want)
    tb = tensorboard_scalars(out / "tensorboard")
    assert set(tb) == set(want)
    assert all(tb[k] == pytest.approx(v, rel=1e-6, abs=1e-30) for k, v in want.items())  # float32 in events
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,name,value"
    assert {(n, int(s)): float(v) for s, n, v in (r.split(",") for r in rows[1:])} == want
    logged, config_keys = {}, set()
    for rec in wandb_records(out):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            step = items.get("_step", rec.history.step.num)
            logged.update({(k, step): v for k, v in items.items() if not k.startswith("_")})
        elif kind == "run":
            config_keys |= {u.key for u in rec.run.config.update}
    assert logged == want
    assert {"region", "lora_r", "lr", "micro_batch", "report_to"} <= config_keys

    res = run(deepspeed_cmd(1, "launch/sft.py", "--config", str(out / "run.json"), "--output-dir", str(again),
                            "--report-to", "wandb"), env={**env, "WANDB_MODE": "no-such-mode"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "--report-to wandb: could not start" in res.stdout + res.stderr
    rerun = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in rerun] == [r.get("loss") for r in records]  # bit-identical on CPU
    first, second = summary["config"], json.loads((again / "run.json").read_text())["config"]
    differ = {k for k in first if first[k] != second[k]}
    assert differ == {"output_dir", "report_to", "explicit"}
    assert not (again / "wandb").exists() and not (again / "tensorboard").exists()


def test_a_nodes_other_ranks_wait_for_its_local_rank_0_to_fetch(tmp_path, monkeypatch):
    """LOCAL_RANK != 0 never fetches: it waits until the cache holds the snapshot (another rank fetching it), and
    gives up after hub.WAIT_S naming the id."""
    import threading

    from lvlm_region.infra import hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "WAIT_S", 30.0)
    hub.snapshot.cache_clear()
    fetcher = threading.Timer(1.0, hub_cache, (tmp_path / "hub", {"org/model": CONFIGS / "llava-1.5-7b"}))
    fetcher.start()  # "LOCAL_RANK 0" fills the cache a second later
    path = hub.local_path("org/model")
    fetcher.join()
    assert Path(path, "config.json").read_bytes() == (CONFIGS / "llava-1.5-7b" / "config.json").read_bytes()
    assert hub.source("org/model")["revision"] == Path(path).name
    monkeypatch.setattr(hub, "WAIT_S", 1.0)
    with pytest.raises(FileNotFoundError, match="--llm org/other: .* this node's LOCAL_RANK 0 did not fetch it "
                                                "within 1 s"):
        hub.local_path("org/other", "--llm")
    hub.snapshot.cache_clear()
    assert hub.local_path(str(CONFIGS / "llava-1.5-7b")) == str(CONFIGS / "llava-1.5-7b")  # a path stays a path
    assert not hub.is_hub_id("docs/configs") and hub.is_hub_id("Qwen/Qwen2.5-VL-7B-Instruct")
    assert not hub.is_hub_id("./x/y") and not hub.is_hub_id("a/b/c")
