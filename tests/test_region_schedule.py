"""--region-schedule: a region whose layers move every N steps (random as LISA, cycle as BAdam), within the spec's
candidate layers, on 2 DeepSpeed ranks under ZeRO-2 and ZeRO-3.

Per period exactly the scheduled layers (and the parts that always train) change; the optimizer holds K layers'
state, not all candidates'; Adam's state restarts at a switch (every element's first step moves by the LR); a run
killed mid-period and continued with --resume auto repeats the uninterrupted run's losses across the switches.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, deepspeed_cmd, run
from lvlm_region.config import RunConfig
from lvlm_region.model import regions, schedule
from lvlm_region.tools.compare import CompareError, check_specs, region_flags, split_regions
from lvlm_region.tools.report import region_label
from lvlm_region.train import checkpoint

FAST = ["--micro-batch", "4", "--num-workers", "0", "--log-every", "1", "--eval-max-samples", "2"]
LAYER = re.compile(r"model\.language_model\.layers\.(\d+)\.(.*)")
PROJECTOR = "model.multi_modal_projector."


def candidates(spec: str = "full", depth: int = 8) -> regions.Region:
    return regions.resolve(spec, depth)


@pytest.mark.parametrize("text,message", [
    ("lisa:2/10", "--region-schedule 'lisa:2/10' is not a schedule"),
    ("random:2", "--region-schedule 'random:2' is not a schedule"),
    ("random:0/10", "--region-schedule 'random:0/10': K and N must be at least 1"),
    ("cycle:2/0", "--region-schedule 'cycle:2/0': K and N must be at least 1"),
])
def test_a_malformed_schedule_is_refused_with_the_valid_forms(text, message):
    with pytest.raises(ValueError) as e:
        RunConfig(stage="sft", output_dir="o", region_schedule=text).resolve(check_paths=False)
    assert message in str(e.value) and "valid schedules: random:K/N" in str(e.value)


@pytest.mark.parametrize("spec,text,message", [
    ("none", "random:2/5", "region 'none' selects no decoder layer to move between; give the layers it may choose "
                           "from as the region (e.g. --region full)"),
    ("uniform25", "random:3/5", "K=3 layers per period, but region 'uniform25' has only 2 candidate layer(s) "
                                "([0, 7]); lower K or widen the region"),
    ("uniform25", "cycle:2/5", "K=2 is every candidate layer of region 'uniform25', so the region never moves"),
])
def test_a_schedule_that_cannot_move_is_refused(spec, text, message):
    with pytest.raises(ValueError) as e:
        schedule.resolve(text, candidates(spec), seed=0)
    assert message in str(e.value)


def test_random_draws_k_candidates_per_period_seeded_and_cycle_walks_the_blocks():
    region = candidates("uniform50.mlp+lm_head")  # candidates 0, 2, 5, 7
    lisa = schedule.resolve("random:2/3", region, seed=5)
    draws = [lisa.layers(p) for p in range(40)]
    assert all(len(set(d)) == 2 and set(d) <= {0, 2, 5, 7} and list(d) == sorted(d) for d in draws)
    assert len(set(draws)) == 6  # every pair of the 4 candidates comes up
    assert draws == [schedule.resolve("random:2/3", region, seed=5).layers(p) for p in range(40)]  # a rerun, a resume
    assert draws != [schedule.resolve("random:2/3", region, seed=6).layers(p) for p in range(40)]
    assert [lisa.period(s) for s in (1, 3, 4, 6, 7)] == [0, 0, 1, 1, 2]  # steps count from 1
    period = lisa.region(3)
    assert period.layers == draws[3] and period.sublayer == "mlp" and period.parts == region.parts
    badam = schedule.resolve("cycle:3/2", candidates("full"), seed=0)
    assert [badam.layers(p) for p in range(4)] == [(0, 1, 2), (3, 4, 5), (6, 7), (0, 1, 2)]  # the last block: the rest
    assert badam.largest().layers == (0, 1, 2)
    assert [(p["first_step"], p["last_step"], p["layers"]) for p in badam.periods(7)] == [
        (1, 2, [0, 1, 2]), (3, 4, [3, 4, 5]), (5, 6, [6, 7]), (7, 7, [0, 1, 2])]


@pytest.mark.parametrize("spec", ["uniform50.mlp+lm_head", "layers:1,3-projector+vision", "full.attn+embed", "none"])
def test_a_period_region_written_out_resolves_to_itself(spec):
    region = dict(regions.resolve(spec, 8).to_dict(), spec=None)
    again = regions.resolve(regions.resolve(spec, 8).explicit(), 8)
    assert dict(again.to_dict(), spec=None) == region


def test_compare_runs_a_moving_arm_from_spec_tilde_schedule():
    specs = split_regions("full,uniform25,full~random:2/10,layers:1,5~cycle:1/4")
    assert specs == ["full", "uniform25", "full~random:2/10", "layers:1,5~cycle:1/4"]
    assert region_flags(specs[2]) == ["--region", "full", "--region-schedule", "random:2/10"]
    assert region_flags(specs[1]) == ["--region", "uniform25"]
    assert check_specs(specs, []) == 8
    with pytest.raises(CompareError, match="K=2 is every candidate layer of region 'uniform25'"):
        check_specs(["uniform25~random:2/10"], [])
    with pytest.raises(CompareError, match="--region-schedule: launch/compare.py sets these per arm"):
        check_specs(["full"], ["--region-schedule", "random:2/10"])
    # the report names a moving arm's region as --regions wrote it
    moving = {"config": {"region": "full", "region_schedule": "random:2/10"}, "region": {"spec": "full"}}
    assert region_label(moving) == "full~random:2/10"
    assert region_label({"config": {"region": "full", "region_schedule": None}, "region": {"spec": "full"}}) == "full"


def test_a_bad_schedule_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "o"
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(out), "--region", "uniform25",
               "--region-schedule", "random:3/10"], timeout=300)
    assert res.returncode == 2
    assert "K=3 layers per period, but region 'uniform25' has only 2 candidate layer(s)" in res.stderr
    assert not out.exists()


def test_zero3_with_checkpointing_is_refused_before_loading(tmp_path):
    out = tmp_path / "o"
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(out), "--region", "full", "--region-schedule",
               "random:2/10", "--zero", "3", "--grad-ckpt"], timeout=300)
    assert res.returncode == 2
    assert ("--region-schedule with --grad-ckpt under ZeRO-3 is not supported: after the first switch DeepSpeed "
            "0.19's ZeRO-3 does not gather the parameters") in res.stderr
    assert "use --zero 2 with --grad-ckpt, or ZeRO-3 without it" in res.stderr
    assert not out.exists()


def test_dry_run_shows_the_first_periods(tmp_path):
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "o"), "--region", "full",
               "--region-schedule", "cycle:4/5", "--dry-run", "1"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("moving:     --region-schedule cycle:4/5 over layers [0, 1, 2, 3, 4, 5, 6, 7]: steps 1-5 layers "
            "[0, 1, 2, 3]; steps 6-10 layers [4, 5, 6, 7]; steps 11-15 layers [0, 1, 2, 3]; ...") in res.stdout
    # 4 layers and the projector
    assert f"trainable:  {4 * 147712 + 24832:,} of 1,487,936 parameters (per period)" in res.stdout


def schedule_check(tmp_path, name: str, *flags: str) -> dict:
    report = tmp_path / f"{name}.json"
    res = run(deepspeed_cmd(2, "tests/helpers/schedule_check.py", str(report), "--", "--output-dir",
                            str(tmp_path / name), *FAST, *flags))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(report.read_text())


def trained_in(names: list[str], layers, sublayer: str | None, always: str) -> list[str]:
    """The names a period trains: the scheduled layers' (or their sub-layer's) tensors and the parts always on."""
    out = []
    for n in names:
        m = LAYER.match(n)
        if m and int(m[1]) in layers and (sublayer is None or m[2].startswith(sublayer)):
            out.append(n)
        elif not m and re.match(always, n):
            out.append(n)
    return sorted(out)


def test_zero2_cycle_trains_exactly_each_block_and_restarts_adam(demo_sft_data, tmp_path):
    """cycle:3/1 on 8 layers: blocks 0-2, 3-5, 6-7, then 0-2 again, one step each; the LM head trains throughout."""
    r = schedule_check(tmp_path, "z2", *demo_sft_data, "--zero", "2", "--region", "full+lm_head",
                       "--region-schedule", "cycle:3/1", "--max-steps", "4", "--warmup-ratio", "0")
    blocks = [[0, 1, 2], [3, 4, 5], [6, 7], [0, 1, 2]]
    assert [p["layers"] for p in r["summary"]["region_schedule"]["periods"]] == blocks
    for period, layers in zip(r["periods"], blocks):
        assert period["changed"] == trained_in(r["names"], layers, None, PROJECTOR + "|lm_head"), period["period"]
        # Adam's state is that of this period's K layers (two moments over each rank's half), not all candidates'
        assert sum(period["optimizer_state"]) == 2 * period["trainable"]
        # the previous engine, its optimizer state and its flat weight buffers are gone
        assert period["previous_engine_freed"] is (None if period["period"] == 0 else True)
        # a fresh Adam: its first step moves an element by lr |g| / (|g| + eps), so each tensor's largest change is
        # the LR (to fp32 rounding of weights near 1); block 0-2 returns in period 3 and starts afresh too (kept
        # moments would scale its step by m / sqrt(v) of two gradients instead)
        assert all(abs(x - 1) < 2e-3 for x in period["max_moved_over_lr"].values()), period["max_moved_over_lr"]
    assert r["periods"][0]["trainable"] > r["periods"][2]["trainable"]  # 3 layers, then the 2 of the last block
    # the FLOP model (step FLOPs, MFU, the cost report's figures) follows each period's trainable set
    flops = [p["flops"] for p in r["periods"]]
    assert flops == [p["flops_of_period_region"] for p in r["periods"]]
    assert flops[0] == flops[1] == flops[3] > flops[2]  # 3 layers' weight gradients, then 2
    summary = r["summary"]
    assert summary["status"] == "complete" and summary["config"]["region_schedule"] == "cycle:3/1"
    assert summary["timing"]["phase_seconds"]["switch"] > 0  # the rebuilds are timed as part of the steps


def test_zero3_random_moves_a_sublayer_within_its_candidates(demo_sft_data, tmp_path):
    """random:2/2 over uniform50.mlp (candidates 0, 2, 5, 7), ZeRO-3 partitions: per period the two drawn layers'
    MLPs and the projector change, nothing else; the optimizer state stays at two MLPs' size; weight decay on the
    matrices only."""
    r = schedule_check(tmp_path, "z3", *demo_sft_data, "--zero", "3", "--region", "uniform50.mlp",
                       "--region-schedule", "random:2/2", "--max-steps", "6", "--seed", "3", "--weight-decay", "0.1")
    sched = schedule.resolve("random:2/2", candidates("uniform50.mlp"), seed=3)
    planned = r["summary"]["region_schedule"]["periods"]
    assert [p["layers"] for p in planned] == [list(sched.layers(p)) for p in range(3)]
    assert len({tuple(p["layers"]) for p in planned}) > 1  # it moved
    for period, plan in zip(r["periods"], planned):
        assert period["changed"] == trained_in(r["names"], plan["layers"], "mlp.", PROJECTOR), period["period"]
        assert sum(period["optimizer_state"]) == 2 * period["trainable"]
        assert period["previous_engine_freed"] is (None if period["period"] == 0 else True)
        assert period["trainable"] == 2 * 98304 + 24832  # two MLPs and the projector
        # matrices decay, biases do not, in every engine: grouped by the whole shape (ZeRO-3's local piece is flat,
        # which had put everything in the no-decay group of the first engine)
        assert period["weight_decay"] == [0.1, 0.0]
        # two steps of one Adam, its state kept within the period: not a first step's change
        assert not all(abs(x - 1) < 2e-3 for x in period["max_moved_over_lr"].values())


def history(out: Path) -> list:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) if "loss" in r else ("eval", r["eval"]) for r in recs]


def test_a_kill_mid_period_resumes_to_the_same_losses_across_switches(demo_sft_data, tmp_path):
    """ZeRO-3, random:2/2, 8 steps, a checkpoint every 3: the run is killed (SIGKILL, every process) once step 3's
    checkpoint exists, in the middle of period 1; --resume auto continues in that period's optimizer and crosses
    the switches at steps 5 and 7 with the uninterrupted run's losses, LRs, gradient norms and final weights."""
    flags = ["--zero", "3", "--region", "full", "--region-schedule", "random:2/2", "--max-steps", "8",
             "--save-every", "3", "--keep-checkpoints", "0", *FAST, *demo_sft_data]
    ref = tmp_path / "ref"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(ref), *flags))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "killed"
    with open(str(out) + ".log", "w") as log:
        proc = subprocess.Popen(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *flags), cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 300
        while checkpoint.find_latest(str(out)) is None:
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.returncode}"
            assert time.time() < deadline, "no checkpoint in 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert checkpoint.find_latest(str(out)).name == "step-00000003"
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # it never finished
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *flags, "--resume", "auto"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step-00000003" in res.stdout
    assert "period 2 (steps 5-6)" in res.stdout and "period 3 (steps 7-8)" in res.stdout
    assert history(out) == history(ref)
    mine, theirs = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in mine)


def test_lora_moves_its_adapters(demo_sft_data, tmp_path):
    """--tuner lora: adapters on every candidate layer; per period only the scheduled layers' adapters and the
    projector change, the base weights never."""
    r = schedule_check(tmp_path, "lora", *demo_sft_data, "--zero", "2", "--tuner", "lora", "--lora-r", "4",
                       "--region", "uniform50", "--region-schedule", "cycle:2/1", "--max-steps", "2", "--grad-ckpt")
    assert [p["layers"] for p in r["summary"]["region_schedule"]["periods"]] == [[0, 2], [5, 7]]
    for period, layers in zip(r["periods"], ([0, 2], [5, 7])):
        # each layer's first step: B starts at zero, so only B moves (A's gradient is B's transpose times ...)
        want = [n for n in trained_in(r["names"], layers, None, PROJECTOR) if "lora_B" in n or n.startswith(PROJECTOR)]
        assert len(want) > 4 and period["changed"] == want


@pytest.mark.parametrize("zero", ["2", "3"])
def test_bf16_keeps_the_fp32_masters_of_what_trains_across_a_switch(demo_sft_data, tmp_path, zero):
    """bf16: each engine keeps fp32 masters of the 16-bit weights; a rebuilt one would make them again from the bf16
    weights, losing what lies below bf16's precision. The projector trains in every period: its masters are the same
    bit for bit on both sides of each switch; per period only the scheduled layers and the projector change."""
    r = schedule_check(tmp_path, f"bf16z{zero}", *demo_sft_data, "--zero", zero, "--precision", "bf16", "--region",
                       "full", "--region-schedule", "random:2/2", "--max-steps", "4")
    planned = r["summary"]["region_schedule"]["periods"]
    assert [p["projector_masters_kept"] for p in r["periods"]] == [None, True]
    for period, plan in zip(r["periods"], planned):
        # in bf16 a norm weight at 1.0 does not move by 2e-3 (its spacing there is 2^-7): a subset changes, but in
        # every scheduled layer, and nothing outside them and the projector
        assert set(period["changed"]) <= set(trained_in(r["names"], plan["layers"], None, PROJECTOR))
        assert {int(LAYER.match(n)[1]) for n in period["changed"] if LAYER.match(n)} == set(plan["layers"])
        assert period["previous_engine_freed"] is (None if period["period"] == 0 else True)


def test_offload_moves_and_frees_each_period(demo_sft_data, tmp_path):
    """ZeRO-2 with the optimizer offloaded to the CPU (DeepSpeedCPUAdam, rebuilt each period): per period exactly the
    scheduled layers and the projector change, and the previous optimizer with its CPU state is freed (ZeRO-2's
    offload leaves a reference to it on every trained parameter; engine.release removes them)."""
    r = schedule_check(tmp_path, "offload", *demo_sft_data, "--zero", "2", "--offload", "--region", "full",
                       "--region-schedule", "random:2/2", "--max-steps", "4")
    for period, plan in zip(r["periods"], r["summary"]["region_schedule"]["periods"]):
        assert period["changed"] == trained_in(r["names"], plan["layers"], None, PROJECTOR), period["period"]
        assert period["previous_engine_freed"] is (None if period["period"] == 0 else True)
        assert sum(period["optimizer_state"]) == 2 * period["trainable"]
