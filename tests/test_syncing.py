"""Experiment syncs that grow linearly (mmlg_ray.distributed.syncing): changed files only, folders made
once, the state saved on a period that grows with the planned trials. benchmarks/sweep_scale.py measures
a whole sweep's uploads at N and 4N trials."""

import os

import pyarrow.fs as pafs

from mmlg_ray.distributed import syncing


class CountingFS:
    """A local pyarrow filesystem that counts the files it is asked to write and the folders to make."""

    type_name = "local"

    def __init__(self):
        self.fs, self.writes, self.dirs = pafs.LocalFileSystem(), [], []

    def create_dir(self, path, recursive=True):
        self.dirs.append(path)
        self.fs.create_dir(path, recursive=recursive)

    def open_output_stream(self, path):
        self.writes.append(path)
        return self.fs.open_output_stream(path)


def test_only_changed_files_are_uploaded_and_folders_made_once(tmp_path):
    src, dst = tmp_path / "staging", tmp_path / "bucket"
    for t in range(3):
        (src / f"trial_{t}").mkdir(parents=True)
        (src / f"trial_{t}" / "result.json").write_text(f'{{"t": {t}}}\n')
    (src / "experiment_state.json").write_text("{}")
    fs = CountingFS()
    syncing.upload_changed(str(src), fs, str(dst))
    assert len(fs.writes) == 4 and len(fs.dirs) == 4  # every file, every folder: the first time
    syncing.upload_changed(str(src), fs, str(dst))
    assert len(fs.writes) == 4  # nothing changed: nothing sent
    with open(src / "trial_1" / "result.json", "a") as f:  # a trial reports again
        f.write('{"t": 1, "step": 2}\n')
    (src / "trial_3").mkdir()
    (src / "trial_3" / "result.json").write_text("{}")  # a new trial
    syncing.upload_changed(str(src), fs, str(dst))
    assert sorted(os.path.relpath(w, dst) for w in fs.writes[4:]) == ["trial_1/result.json", "trial_3/result.json"]
    assert len(fs.dirs) == 5  # only the new trial's folder
    assert (dst / "trial_1" / "result.json").read_text() == (src / "trial_1" / "result.json").read_text()


def test_tunes_experiment_syncer_uses_it():
    """The hook is where Ray 2.58 builds its experiment upload; a Ray that moved it fails here."""
    from ray.train._internal.storage import _FilesystemSyncer

    syncing.incremental_uploads()
    syncer = _FilesystemSyncer(storage_filesystem=pafs.LocalFileSystem(), sync_period=1, sync_timeout=10)
    fn, kw = syncer._sync_up_command(local_path="/a", uri="/b")
    assert fn is syncing.upload_changed and kw["fs_path"] == "/b"


def test_state_period_grows_with_the_planned_trials(monkeypatch):
    assert syncing.state_period(40) == 10.0 and syncing.state_period(1512) == 0.2 * 1512
    monkeypatch.setattr(syncing, "USER_PERIOD", None)
    monkeypatch.delenv(syncing.PERIOD_ENV, raising=False)
    with syncing.state_period_set(1512):
        assert os.environ[syncing.PERIOD_ENV] == "302.4"
    assert syncing.PERIOD_ENV not in os.environ  # not left for a later job of this process
    monkeypatch.setattr(syncing, "USER_PERIOD", "1")  # the user's own setting wins
    monkeypatch.setenv(syncing.PERIOD_ENV, "1")
    with syncing.state_period_set(1512):
        assert os.environ[syncing.PERIOD_ENV] == "1"
