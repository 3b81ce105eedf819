"""Ray end-to-end tests (tiny sizes, one Ray instance per session): bf16 ZeRO-3 (+ offload)
extraction on Ray Train with a crash and resume; the Tune sweep interrupted mid-way and resumed, and
its trials killed, failed for good, retried and superseded."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mmlg_ray.method.learngene import load_learngene

ROOT = Path(__file__).resolve().parents[1]


def test_bf16_zero3_offload_elastic_extraction_crashes_resumes_and_yields_an_fp32_learngene(
    tiny_overrides, tiny_ancestor, ray_address, tmp_path, monkeypatch
):
    """precision=bf16, DeepSpeed ZeRO-3 on 2 Ray Train workers, optimizer and parameters offloaded to
    the CPU, elastic extraction (descendant shapes expanded inside the engine's forward, where ZeRO-3
    gathers what they read); one worker crashes right after the first checkpoint (step 6 of 12), Ray
    Train restarts the workers, which resume from that checkpoint (partitioned, offloaded state), not
    from step 0. The student and the teacher run in bf16 (the teacher used to stay fp32 and crash on
    bf16 images); the learngene is consolidated from the fp32 master weights, has the fixed one's
    tensors trained away from the warm start, and makes a working descendant. ZeRO-2 runs in every
    sweep below (the default) and crashes on two nodes in test_two_nodes."""
    from safetensors import safe_open

    from mmlg_ray.config import load_config
    from mmlg_ray.engine import pipeline
    from mmlg_ray.method.descend import descendant_spec, init_descendant
    from mmlg_ray.distributed.extract import extract_on_ray
    from mmlg_ray.method.train import lr_lambda

    cfg = load_config(
        None,
        tiny_overrides
        + [
            "descendants.grid.depth=[1,2]",
            "descendants.grid.width=[64,128]",
            "precision=bf16",
            "ray.extraction.zero_stage=3",
            "ray.extraction.offload_optimizer=true",
            "ray.extraction.offload_params=true",
            "ray.num_workers=2",
            "ray.max_failures=1",
        ],
    )
    monkeypatch.setenv("MMLG_FAIL_AT_STEP", "6")
    out = tmp_path / "lg.safetensors"
    cost = extract_on_ray(cfg, tiny_ancestor, out, storage=str(tmp_path / "ray"), mode="elastic")
    assert cost["resumed_from_step"] == 6
    # the crash, counted by Ray Train's own cause (a worker group's error: a retry, not a preemption), and
    # the work both workers did between the step-6 checkpoint and the crash, lost
    assert (cost["retries"], cost["preemptions"]) == (1, 0) and 0 < cost["lost_device_s"] < 120
    assert cost["steps"] == 12 and cost["devices"] == 2 and cost["zero_stage"] == 3
    assert cost["precision"] == "bf16" and math.isfinite(cost["final_loss"])
    assert cost["extraction_mode"] == "elastic" and cost["elastic_flops"] > 0
    assert math.isfinite(cost["final_elastic_loss"]) and math.isfinite(cost["final_distill_smallest"])
    ecfg = cfg.learngene.extraction
    assert cost["final_lr"] == pytest.approx(ecfg.lr * lr_lambda(ecfg)(12))  # the project's schedule held
    with safe_open(str(out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    # fp32 master weights, not bf16 weights cast up: trained tensors hold values bf16 cannot represent
    trained = [t for k, t in tensors.items() if k.startswith(("multimodal.", "unimodal."))]
    assert any((t != t.bfloat16().float()).any() for t in trained)
    lg = load_learngene(out)
    assert lg.meta.cost["backend"] == "ray_train+deepspeed" and lg.meta.extraction_mode == "elastic"
    # the fixed extraction's learngene tensors, trained away from the warm start
    start = pipeline.build_aux(cfg, tiny_ancestor, "mmlg", mode="elastic")
    names = {f"learngene.tensors.{k.replace('.', '__')}" for k in lg.tensors if not k.startswith("inherited.")}
    assert names == {n for n, _ in start.named_parameters() if n.startswith("learngene.")}
    moved = [k for k, v in start.learngene.state_tensors().items() if not torch.allclose(lg.tensors[k], v)]
    assert len(moved) > len(lg.tensors) // 4
    spec = descendant_spec(lg.meta.model_spec, 2, 64)
    model = init_descendant("mmlg", "image_text", spec, learngene=lg)
    img, txt, _ = model(
        torch.randn(2, 3, spec.image_size, spec.image_size), torch.randint(1, 999, (2, spec.context_length))
    )
    assert torch.isfinite(img).all() and img.shape == (2, spec.embed_dim)


def _finished_trials(run_dir: Path) -> dict[str, int]:
    done = {}
    for rj in run_dir.glob("ray/sweep-*/*/result.json"):
        lines = [ln for ln in rj.read_text().splitlines() if ln.strip()]
        if any(json.loads(ln).get("final_report") for ln in lines):
            done[rj.parent.name] = len(lines)
    return done


def _terminated_in_tune_state(run_dir: Path) -> set[str]:
    """Trial ids that Tune's saved experiment state records as TERMINATED. Tune saves that state after a
    trial's final result, so a driver killed in between resumes the trial from its last checkpoint (Tune's
    at-least-once semantics): only trials recorded here are certain not to run again."""
    ids = set()
    for f in run_dir.glob("ray/sweep-*/experiment_state-*.json"):
        try:
            entries = json.loads(f.read_text()).get("trial_data", [])
        except (json.JSONDecodeError, OSError):  # being written
            continue
        ids |= {t["trial_id"] for t in (json.loads(e[0]) for e in entries) if t.get("status") == "TERMINATED"}
    return ids


def _settled_trials(run_dir: Path) -> dict[str, int]:
    """Finished trials (final report written) that Tune's saved state records as terminated."""
    done = _terminated_in_tune_state(run_dir)
    return {name: n for name, n in _finished_trials(run_dir).items() if name.split("_")[2] in done}


def test_sweep_interrupted_and_resumed_has_each_trial_once(
    tiny_overrides, ray_address, seed_learngene, tmp_path, caplog, capsys
):
    out = tmp_path / "sweep"
    sets = tiny_overrides + [
        f"ray.address={ray_address}",
        "descendants.grid.method=[mmlg,scratch,pt_ft]",
        "descendants.seeds=[0,1]",
        "ray.tune.num_samples=2",
        "descendants.finetune.steps=30",
        "descendants.finetune.eval_every=10",
    ]
    seed_learngene(out, sets)  # the trials are under test here; extraction on Ray Train is test_logs' and others'
    argv = [sys.executable, str(ROOT / "jobs/sweep.py"), "--output", str(out)] + sum((["--set", s] for s in sets), [])
    log = open(tmp_path / "first.log", "w")
    # Tune saves its experiment state on a period (auto: every 10 s or more; nothing forces a save per
    # checkpoint): every second here, so that some trial is recorded finished while the sweep still runs
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None and not _settled_trials(out):
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep
        proc.wait()
        log.close()
    before = _settled_trials(out)
    unsettled = {k: n for k, n in _finished_trials(out).items() if k not in before}
    assert before, (tmp_path / "first.log").read_text()[-3000:]
    assert "extraction mmlg: reusing" in (tmp_path / "first.log").read_text()  # the seeded learngene
    assert not (out / "trials.parquet").exists()

    from jobs import sweep as sweep_job

    # the experiment's identity is its result-affecting config: an operational change (the report's
    # prices, threads) neither hides the interrupted run nor lets it be started over by mistake
    ops = ["report.pricing=spot", "threads=2"]
    assert sweep_job.main(["--output", str(out)] + sum((["--set", s] for s in sets + ops), [])) == 2
    assert "--resume" in capsys.readouterr().err
    # a setting the restored Tune experiment would silently keep from its first run is refused, named
    baked = ["ray.tune.max_concurrent=1"]
    assert sweep_job.main(["--output", str(out), "--resume"] + sum((["--set", s] for s in sets + ops + baked), [])) == 2
    err = capsys.readouterr().err
    assert "ray.tune.max_concurrent" in err and "--fresh" in err and len(err.strip().splitlines()) == 1
    # `ray job stop` sends SIGTERM: the resumed sweep stops as on Ctrl-C once one more trial is settled
    # (Tune saves its state, the trials stop), says to rerun with --resume, and exits 1
    argv_resume = argv + ["--resume"] + sum((["--set", s] for s in ops), [])
    with open(tmp_path / "second.log", "w") as log:
        proc = subprocess.Popen(argv_resume, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None and len(_settled_trials(out)) <= len(before):
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)  # the driver (Ray's job supervisor signals it and its children)
            proc.wait(120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    second = (tmp_path / "second.log").read_text()
    assert proc.returncode == 1, second[-3000:]
    assert "SIGTERM received" in second and "Experiment has been interrupted" in second, second[-3000:]
    (said,) = [ln for ln in second.splitlines() if ln.startswith("failed: ")]  # the job's one closing line
    assert "interrupted" in said and "rerun with --resume" in said
    assert not (out / "trials.parquet").exists()
    with caplog.at_level(logging.INFO, logger="mmlg_ray"):
        assert sweep_job.main(["--output", str(out), "--resume"] + sum((["--set", s] for s in sets + ops), [])) == 0
    assert "restored the plan of" in caplog.text  # the search's records (and so its rungs) came back

    trials = pd.read_parquet(out / "trials.parquet")
    cells = 3
    assert len(trials) == cells * 2 + cells * 1  # search: 2 Optuna samples per cell; seeds: 1 more seed per cell
    assert trials.trial_id.is_unique
    # every row is complete, trials cut by ASHA included
    assert trials.task.notna().all() and (trials.params > 0).all() and trials.final_score.notna().all()
    assert set(trials.phase) == {"search", "seeds"}
    # finished before the interruption: kept, not run again
    after = _finished_trials(out)
    for name, n_lines in before.items():
        assert after[name] == n_lines
    # finished but not yet recorded by Tune when the driver died: resumed from the trial's checkpoint, not rerun
    for name, n_lines in unsettled.items():
        rj = next(out.glob(f"ray/sweep-*/{name}/result.json"))
        rows = [json.loads(ln) for ln in rj.read_text().splitlines() if ln.strip()]
        assert len(rows) == n_lines or rows[-1]["resumed_from_step"] > 0, name
    documented = [
        "trial",
        "method",
        "modality",
        "depth",
        "width",
        "image_depth",
        "text_depth",
        "heads",
        "params",
        "seed",
        "lr",
        "weight_decay",
        "task",
        "final_score",
        "best_score",
        "epochs",
        "stopped_early",
        "finetune_wall_s",
        "finetune_device_s",
        "finetune_flops",
        "pretrain_wall_s",
        "pretrain_flops",
        "val_score",
        "best_val_score",
        "arm",
        "extraction",
        "pt_budget",
    ]
    assert set(documented) <= set(trials.columns)
    # the seeds phase re-runs each cell's search trial of best *validation* score, never the best test score
    search = trials[(trials.phase == "search") & (trials.status != "error")]
    for key, g in search.groupby(["arm", "modality", "depth", "width"]):
        chosen = g.loc[g.val_score.idxmax()]
        seeded = trials[
            (trials.phase == "seeds") & (trials[["arm", "modality", "depth", "width"]].apply(tuple, axis=1) == key)
        ]
        assert (
            len(seeded) == 1 and seeded.lr.iloc[0] == chosen.lr and seeded.weight_decay.iloc[0] == chosen.weight_decay
        )
    assert (trials[trials.method == "pt_ft"].pretrain_flops > 0).all()
    hist = pd.read_parquet(out / "history.parquet")
    assert set(hist.trial) == set(trials.trial)
    stages = pd.read_parquet(out / "stages.parquet")
    assert {"ancestor", "extraction", "pretrain"} <= set(stages.stage)
    # run again without --resume, report settings changed: same experiment, so only the report is rebuilt
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmlg_ray"):
        assert (
            sweep_job.main(
                ["--output", str(out)] + sum((["--set", s] for s in sets + ["report.pricing=on_demand"]), [])
            )
            == 0
        )
    assert "rebuilding the report only" in caplog.text
    assert "pricing: on_demand" in (out / "config.yaml").read_text()
    assert _finished_trials(out) == after


def test_trial_with_a_two_worker_torchtrainer_reaches_tune(tiny_overrides, ray_address, tmp_path):
    """ray.tune.trial_workers=2: the fine-tuning runs data-parallel in a TorchTrainer inside the trial."""
    from jobs import sweep as sweep_job

    out = tmp_path / "ddp"
    sets = tiny_overrides + [
        f"ray.address={ray_address}",
        "descendants.grid.method=[scratch]",
        "descendants.seeds=[0]",
        "ray.tune.num_samples=1",
        "ray.tune.trial_workers=2",
        "ray.tune.trial_cpus=0.5",
        "descendants.finetune.steps=20",
    ]
    assert sweep_job.main(["--output", str(out)] + sum((["--set", s] for s in sets), [])) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 1
    row = trials.iloc[0]
    assert row.workers == 2 and not row.stopped_early and row.epochs == 2
    assert row.finetune_device_s == pytest.approx(2 * row.finetune_wall_s)
    assert 0 <= row.final_score <= 100
    # its checkpoints (the inner Ray Train run's, ft-<trial id>) went with the finished experiment
    assert [p.name for p in out.rglob("ft-*")] == [f"ft-{row.trial_id}"]
    assert not [p for p in out.rglob("checkpoint_*") if p.is_dir()]  # Train names its own checkpoint_<date>


def _result_lines(run_dir: Path) -> list[list[dict]]:
    return [
        [json.loads(ln) for ln in rj.read_text().splitlines() if ln.strip()]
        for rj in sorted(run_dir.glob("ray/sweep-*/*/result.json"))
    ]


def _one_trial_argv(tiny_overrides, ray_address, out: Path, max_failures: int) -> list[str]:
    """jobs/sweep.py's argv for one scratch trial of 30 steps, evaluated (and checkpointed) every 10."""
    sets = tiny_overrides + [
        f"ray.address={ray_address}",
        "descendants.grid.method=[scratch]",
        "descendants.seeds=[0]",
        "ray.tune.num_samples=1",
        "descendants.finetune.steps=30",
        "descendants.finetune.eval_every=10",
        f"ray.max_failures={max_failures}",
    ]
    return ["--output", str(out)] + sum((["--set", s] for s in sets), [])


def test_trial_whose_worker_is_killed_resumes_from_its_checkpoint(tiny_overrides, ray_address, tmp_path, monkeypatch):
    """The trial's worker process is SIGKILLed right after its first evaluation's checkpoint (step 10
    of 30): Tune restarts it in a new process from that checkpoint, not from step 0."""
    from jobs import sweep as sweep_job

    out = tmp_path / "killed"
    monkeypatch.setenv("MMLG_KILL_TRIAL_AT_STEP", "10")
    argv = _one_trial_argv(tiny_overrides, ray_address, out, max_failures=1)
    assert sweep_job.main(argv) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 1
    row = trials.iloc[0]
    assert row.status == "finished" and row.error == "" and row.resumed_from_step == 10 and row.epochs == 3
    assert (row.retries, row.preemptions) == (1, 0)  # a process killed without notice: a failure, as Tune counts it
    # the work between the step-10 checkpoint and the kill, seen by the driver as lost (and charged in the spend)
    assert 0 < row.lost_device_s < 60
    (lines,) = _result_lines(out)
    assert [ln["step"] for ln in lines] == [10, 20, 30]  # step 10 reported once: resumed after it, not from 0
    assert lines[0]["pid"] != lines[1]["pid"] == lines[2]["pid"]  # a new worker process after the kill
    hist = pd.read_parquet(out / "history.parquet")
    assert list(hist.step) == [10, 20, 30]
    assert not list(out.glob("ray/sweep-*/*/checkpoint_*"))  # a finished trial's checkpoints go with its experiment
    # --fresh starts the experiment over (its Tune state removed), --fresh with --resume is refused
    monkeypatch.delenv("MMLG_KILL_TRIAL_AT_STEP")
    assert sweep_job.main(argv + ["--fresh", "--resume"]) == 2
    assert sweep_job.main(argv + ["--fresh"]) == 0
    again = pd.read_parquet(out / "trials.parquet")
    assert len(again) == 1 and again.trial_id[0] != row.trial_id and again.resumed_from_step[0] == 0
    assert len(_result_lines(out)) == 1


def _argv(tiny_overrides, ray_address, out: Path, extra: list[str]) -> list[str]:
    sets = (
        tiny_overrides
        + [
            f"ray.address={ray_address}",
            "descendants.grid.method=[scratch]",
            "descendants.seeds=[0,1]",
            "descendants.finetune.steps=30",
            "descendants.finetune.eval_every=10",
            "ray.max_failures=0",
        ]
        + extra
    )
    return ["--output", str(out)] + sum((["--set", s] for s in sets), [])


def test_resume_after_a_trial_failed_for_good_completes_with_the_cells_seed_reruns(
    tiny_overrides, ray_address, tmp_path, monkeypatch, capsys
):
    """The issue's reproduction: 2 cells, one search trial each, ray.max_failures=0, one trial SIGKILLed
    mid-trial. The job exits 1 naming that cell; --resume retries the trial (from its checkpoint), and
    the cell gets its seed re-run with its (now finished) best hyper-parameters: each trial once."""
    from jobs import sweep as sweep_job

    out = tmp_path / "resume"
    argv = _argv(tiny_overrides, ray_address, out, ["descendants.grid.modality=[image,text]", "ray.tune.num_samples=1"])
    monkeypatch.setenv("MMLG_KILL_TRIAL_AT_STEP", "10")
    monkeypatch.setenv("MMLG_KILL_TRIAL_WHERE", json.dumps({"cell": "scratch|image|2|64"}))
    assert sweep_job.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 2 grid cells are incomplete" in err and "scratch|image|2|64" in err and "--resume" in err
    first = pd.read_parquet(out / "trials.parquet")
    assert sorted(zip(first.modality, first.phase, first.status)) == [
        ("image", "search", "error"),
        ("text", "search", "finished"),
        ("text", "seeds", "finished"),
    ]
    dead = first[first.modality == "image"].iloc[0]  # on record: its error's first line, what it reported
    assert "died" in dead.error.lower() and "\n" not in dead.error and not dead.stopped_early
    assert dead.epochs == 1 and dead.best_score == dead.final_score
    assert json.loads((out / "experiment.json").read_text())["complete"] is False
    kept = [p for p in out.glob("ray/sweep-*/*/checkpoint_*") if (p / "finetune.pt").is_file()]
    assert len(kept) == 1 and "image" in kept[0].parent.name  # the errored trial's, which --resume retries from
    assert sweep_job.main(argv) == 2  # incomplete: a plain rerun asks for --resume or --fresh
    capsys.readouterr()

    monkeypatch.delenv("MMLG_KILL_TRIAL_AT_STEP")
    assert sweep_job.main(argv + ["--resume"]) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and trials.trial_id.is_unique and (trials.status == "finished").all()
    image = trials[trials.modality == "image"].set_index("phase")
    assert image.loc["search", "trial_id"] == first[first.modality == "image"].trial_id.iloc[0]  # retried, same trial
    assert image.loc["search", "resumed_from_step"] == 10  # from its checkpoint, not from step 0
    assert image.loc["seeds", "seed"] == 1 and image.loc["seeds", "lr"] == image.loc["search", "lr"]
    assert set(trials[trials.modality == "text"].trial_id) == set(first[first.modality == "text"].trial_id)  # kept
    assert json.loads((out / "experiment.json").read_text())["complete"] is True
    assert not list(out.glob("ray/*/*/checkpoint_*"))


def test_a_best_trial_that_changes_on_resume_gets_new_seed_reruns_and_the_old_ones_are_superseded(
    tiny_overrides, ray_address, tmp_path, monkeypatch
):
    """A cell's better candidate dies; its seed re-run goes ahead at the worse one. On --resume the better
    one finishes, the cell's best changes, and its seed re-run runs again at the new best hyper-parameters;
    the earlier one stays on record as `superseded`, outside every result."""
    from jobs import sweep as sweep_job
    from mmlg_ray.report import final_trials
    from mmlg_ray.engine.search import shape_candidates

    out = tmp_path / "best"
    lr = (1e-8, 1e-2)
    c0, c1 = shape_candidates(0, "image|1|128", 2, lr, (0.0, 0.2))
    assert c0["lr"] < 1e-7 < 1e-3 < c1["lr"]  # candidate 0 cannot learn in 30 steps, candidate 1 can
    argv = _argv(
        tiny_overrides,
        ray_address,
        out,
        [
            "descendants.grid.modality=[image]",
            "descendants.grid.depth=[1]",
            "descendants.grid.width=[128]",
            "ray.tune.num_samples=2",
            f"ray.tune.search_space.lr=[{lr[0]},{lr[1]}]",
            "ray.tune.grace_period=3",
        ],
    )
    monkeypatch.setenv("MMLG_KILL_TRIAL_AT_STEP", "10")
    monkeypatch.setenv("MMLG_KILL_TRIAL_WHERE", json.dumps({"candidate": 1}))
    assert sweep_job.main(argv) == 1
    first = pd.read_parquet(out / "trials.parquet")
    old_seed = first[first.phase == "seeds"]
    assert len(old_seed) == 1 and old_seed.lr.iloc[0] == pytest.approx(c0["lr"])
    monkeypatch.delenv("MMLG_KILL_TRIAL_AT_STEP")
    assert sweep_job.main(argv + ["--resume"]) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and trials.trial_id.is_unique
    search = trials[trials.phase == "search"].set_index("candidate")
    assert (search.status == "finished").all()
    assert search.loc[1, "val_score"] > search.loc[0, "val_score"], search[["lr", "val_score"]]
    seeds = trials[trials.phase == "seeds"].set_index("trial_id")
    assert seeds.loc[old_seed.trial_id.iloc[0], "status"] == "superseded"
    new = seeds[seeds.status == "finished"]
    assert len(new) == 1 and new.lr.iloc[0] == pytest.approx(c1["lr"]) and new.seed.iloc[0] == 1
    chosen = final_trials(trials)
    assert set(chosen.trial_id) == {search.loc[1, "trial_id"], new.index[0]}  # the superseded row is in no result
