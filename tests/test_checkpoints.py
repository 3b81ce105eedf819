"""Trial checkpoints without Tune's pruning (mmlg_ray.distributed.checkpoints): a newer checkpoint
turns the older ones into tombstones; a trial restored from a tombstone resumes from the newest full
checkpoint; an ended experiment's finished trials lose theirs, errored ones keep theirs. On a local
folder, with Ray's own Checkpoint and Result classes; no Ray cluster."""

import json

import pyarrow.fs as pafs
import pytest
import torch
from ray.tune import Checkpoint
from ray.tune import Result

from mmlg_ray.distributed.checkpoints import TOMBSTONE, CheckpointPruner, drop_finished
from mmlg_ray.distributed.trial import CKPT_FILE, _load_checkpoint


def _ckpt(trial, i, step):
    d = trial / f"checkpoint_{i:06d}"
    d.mkdir(parents=True)
    torch.save({"step": step}, d / CKPT_FILE)
    return d


def test_a_newer_checkpoint_buries_the_older_ones_and_a_restore_from_one_resumes_from_the_newest(tmp_path):
    trial = tmp_path / "trial_a"
    c0, c1 = _ckpt(trial, 0, 10), _ckpt(trial, 1, 20)
    CheckpointPruner().on_checkpoint(0, [], None, Checkpoint(str(c1)))
    assert sorted(p.name for p in c0.iterdir()) == [TOMBSTONE]  # weights gone, folder kept
    assert json.loads((c0 / TOMBSTONE).read_text()) == {"superseded_by": "checkpoint_000001"}
    assert (c1 / CKPT_FILE).is_file() and not (c1 / TOMBSTONE).exists()
    c2 = _ckpt(trial, 2, 30)
    CheckpointPruner().on_checkpoint(0, [], None, Checkpoint(str(c2)))
    # the driver dies while checkpoint 3 is being written (never registered, its file cut short), and
    # Tune's last saved state still names checkpoint 0
    c3 = trial / "checkpoint_000003"
    c3.mkdir()
    (c3 / CKPT_FILE).write_bytes((c2 / CKPT_FILE).read_bytes()[:40])
    assert _load_checkpoint(Checkpoint(str(c0)))["step"] == 30  # the newest full one that loads
    assert _load_checkpoint(Checkpoint(str(c2)))["step"] == 30
    # restored from that state, the trial counts on from checkpoint 0: its next one (step 40) lands in
    # checkpoint 1's folder, a tombstone of the killed run; registering it buries every other folder
    torch.save({"step": 40}, c1 / CKPT_FILE)
    (c1 / TOMBSTONE).write_text('{"superseded_by": "checkpoint_000002"}')
    CheckpointPruner().on_checkpoint(0, [], None, Checkpoint(str(c1)))
    assert not (c1 / TOMBSTONE).exists() and (c1 / CKPT_FILE).is_file()
    for c in (c0, c2, c3):
        assert sorted(p.name for p in c.iterdir()) == [TOMBSTONE], c.name
    assert _load_checkpoint(Checkpoint(str(c1)))["step"] == 40  # a worker lost now: Tune restores 1
    assert _load_checkpoint(Checkpoint(str(c0)))["step"] == 40  # the driver lost now, its state naming 0
    # the checkpoint Tune registered fails to load (a read error): the attempt fails and Tune retries it,
    # rather than the trial starting over (and its next checkpoint burying the good one)
    (c1 / CKPT_FILE).write_bytes(b"not a torch file")
    with pytest.raises(Exception):
        _load_checkpoint(Checkpoint(str(c1)))


def test_a_tombstone_with_no_full_checkpoint_beside_it_starts_from_step_0(tmp_path, caplog):
    c0 = tmp_path / "trial_b" / "checkpoint_000000"
    c0.mkdir(parents=True)
    (c0 / TOMBSTONE).write_text('{"superseded_by": "checkpoint_000001"}')
    assert _load_checkpoint(Checkpoint(str(c0))) is None
    assert "starting from step 0" in caplog.text
    (tmp_path / "not_a_folder").write_text("x")  # listing the trial's folder fails
    CheckpointPruner().on_checkpoint(0, [], None, Checkpoint(str(tmp_path / "not_a_folder" / "checkpoint_000001")))
    assert "could not prune" in caplog.text  # logged: an error here must not keep Tune from registering
    assert _load_checkpoint(None) is None


@pytest.mark.parametrize("errored", [False, True])
def test_an_ended_experiment_drops_its_finished_trials_checkpoints_and_keeps_an_errored_ones(tmp_path, errored):
    trial = tmp_path / "ray" / "sweep-x" / "trial_c"
    _ckpt(trial, 0, 10)
    _ckpt(trial, 1, 20)
    (trial / "result.json").write_text("{}\n")
    # a multi-worker trial's own Ray Train run beside the experiment, its checkpoints named by date
    ft = tmp_path / "ray" / "ft-abc"
    (ft / "checkpoint_2026-12-07_10-00-00.000000").mkdir(parents=True)
    (ft / "checkpoint_2026-12-07_10-00-00.000000" / "finetune.pt").write_bytes(b"x")
    (ft / "checkpoint_manager_snapshot.json").write_text("{}")
    res = Result(
        metrics={"trial_id": "abc"},
        checkpoint=None,
        error=RuntimeError("worker died") if errored else None,
        path=str(trial),
        _storage_filesystem=pafs.LocalFileSystem(),
    )
    assert drop_finished([res]) == (0 if errored else 3)
    assert sorted(p.name for p in trial.iterdir()) == (
        ["checkpoint_000000", "checkpoint_000001", "result.json"] if errored else ["result.json"]
    )
    assert len(list(ft.iterdir())) == (2 if errored else 1)  # Train's own state file stays


def test_an_experiment_saved_before_the_package_split_still_loads():
    """tests/data/sweep_state_42d9002.pkl: a PlanSearcher (with its SweepPlan) and a PlanScheduler
    pickled by commit 42d9002, when they lived in mmlg_ray.distributed.sweep and mmlg_ray.search, as
    Tune pickles them into tuner.pkl. A restore must still read them."""
    import pickle
    from pathlib import Path

    from mmlg_ray.distributed.tune import PlanScheduler, PlanSearcher, old_module_homes
    from mmlg_ray.engine.search import SweepPlan

    old_module_homes()
    state = pickle.loads((Path(__file__).parent / "data" / "sweep_state_42d9002.pkl").read_bytes())
    assert isinstance(state["search_alg"], PlanSearcher) and isinstance(state["scheduler"], PlanScheduler)
    assert isinstance(state["search_alg"].plan, SweepPlan) and state["search_alg"].plan.settings.max_t == 2


def test_restarts_are_counted_by_cause_as_tune_counts_failures(ray_address, tmp_path):
    """A real Tune Trial takes each error through Tune's own handle_error, which counts a failure
    (against max_failures) for anything but an actor lost with a node drained as preempted;
    RestartCounter sorts each recovery by that, into the live plan's record of the trial."""
    from ray.exceptions import RayActorError
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from mmlg_ray.distributed import tune as T

    trial = Trial("trial_fn", stub=True, storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="e"))
    trial.init_local_path()
    now = [100.0]
    counter = T.RestartCounter("restarts-test", devices=2, clock=lambda: now[0])

    class Plan:
        records = {trial.trial_id: {"status": "running"}}

    T._LIVE["restarts-test"] = type("Live", (), {"plan": Plan()})()
    try:
        counter.on_trial_start(0, [trial], trial)
        for err in (
            RayActorError(preempted=True),
            RayActorError(),
            RuntimeError("a bug"),
            RayActorError(preempted=True),
        ):
            now[0] += 3.0  # 3 s of work since the start or the last result (its checkpoint): lost
            trial.handle_error(err)  # Tune's classification
            counter.on_trial_recover(0, [trial], trial)
            now[0] += 10.0  # not lost: up to the next result
            counter.on_trial_result(0, [trial], trial, {})
        now[0] += 1.5
        counter.on_trial_error(0, [trial], trial)  # failed for good: its last 1.5 s lost too
        assert trial.run_metadata.num_failures == 2  # what max_failures saw: the two that were not preemptions
        lost = 2 * (4 * 3.0 + 1.5)  # x 2 devices
        assert T._RESTARTS["restarts-test"][trial.trial_id] == {"preemptions": 2, "retries": 2, "lost_device_s": lost}
        assert Plan.records[trial.trial_id] == {
            "status": "running",
            "preemptions": 2,
            "retries": 2,
            "lost_device_s": lost,
        }
    finally:
        T._LIVE.pop("restarts-test", None)
        T._RESTARTS.pop("restarts-test", None)


def test_a_restart_counter_pickled_by_an_earlier_version_still_counts():
    """Tune's restore unpickles the run's callbacks from tuner.pkl without __init__: a RestartCounter saved
    before it had devices, clock and _since keeps working (as the OLD_HOMES shims keep old runs restorable)."""
    import pickle
    from types import SimpleNamespace

    from mmlg_ray.distributed import tune as T

    old = T.RestartCounter.__new__(T.RestartCounter)
    old.__dict__.update({"name": "old-run", "_at_start": {}})  # all an earlier version's instance held
    counter = pickle.loads(pickle.dumps(old))
    trial = SimpleNamespace(trial_id="t1", run_metadata=SimpleNamespace(num_failures=0))
    try:
        counter.on_trial_start(0, [trial], trial)
        trial.run_metadata.num_failures = 1
        counter.on_trial_recover(0, [trial], trial)
        counts = T._RESTARTS["old-run"]["t1"]
        assert counts["retries"] == 1 and counts["preemptions"] == 0 and counts["lost_device_s"] >= 0
    finally:
        T._RESTARTS.pop("old-run", None)
