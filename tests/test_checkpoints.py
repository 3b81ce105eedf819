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
    # Tune's saved state still names checkpoint 0 (the driver died before it saved a newer one)
    assert _load_checkpoint(Checkpoint(str(c0)))["step"] == 20
    assert _load_checkpoint(Checkpoint(str(c1)))["step"] == 20
    # a restored run's first checkpoint buries what the killed run left, and nothing newer
    c2 = _ckpt(trial, 2, 30)
    c3 = _ckpt(trial, 3, 40)  # written after 2, not yet registered
    CheckpointPruner().on_checkpoint(0, [], None, Checkpoint(str(c2)))
    assert not (c1 / CKPT_FILE).exists() and (c1 / TOMBSTONE).is_file()
    assert (c3 / CKPT_FILE).is_file() and (c2 / CKPT_FILE).is_file()
    assert _load_checkpoint(Checkpoint(str(c0)))["step"] == 40  # the newest full one


def test_a_tombstone_with_no_full_checkpoint_beside_it_starts_from_step_0(tmp_path, caplog):
    c0 = tmp_path / "trial_b" / "checkpoint_000000"
    c0.mkdir(parents=True)
    (c0 / TOMBSTONE).write_text('{"superseded_by": "checkpoint_000001"}')
    assert _load_checkpoint(Checkpoint(str(c0))) is None
    assert "starting from step 0" in caplog.text
    assert _load_checkpoint(None) is None


@pytest.mark.parametrize("errored", [False, True])
def test_an_ended_experiment_drops_its_finished_trials_checkpoints_and_keeps_an_errored_ones(tmp_path, errored):
    trial = tmp_path / "trial_c"
    _ckpt(trial, 0, 10)
    _ckpt(trial, 1, 20)
    (trial / "result.json").write_text("{}\n")
    res = Result(
        metrics={},
        checkpoint=None,
        error=RuntimeError("worker died") if errored else None,
        path=str(trial),
        _storage_filesystem=pafs.LocalFileSystem(),
    )
    assert drop_finished([res]) == (0 if errored else 2)
    assert sorted(p.name for p in trial.iterdir()) == (
        ["checkpoint_000000", "checkpoint_000001", "result.json"] if errored else ["result.json"]
    )
