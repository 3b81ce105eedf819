"""Experiment syncing that grows linearly with the trials.

Ray Tune (2.58) saves its experiment state every `TUNE_GLOBAL_CHECKPOINT_S` ("auto": about every 10 s)
and then uploads the driver's whole experiment folder to the storage path
(ray/tune/execution/experiment_state.py, `sync_up_experiment_state` -> `storage.syncer.sync_up`, which
copies every file: ray/train/_internal/storage.py, `_upload_to_fs_path`). That folder holds every
trial's result files, written by the driver's loggers, and the experiment state, which grows with the
trials. With uploads every 10 s for a run whose length grows with the trials, both the bytes and the
requests grow with the square of the trial count: measured with benchmarks/sweep_scale.py, 24 puts of
trial results per trial at 40 trials and 95 at 160.

Two changes make it linear:

- `incremental_uploads()`: the syncer uploads only the files that changed since its last upload to the
  same place (by size and modification time), and creates each folder once. Ray's own copy is kept for
  uploads with exclusions (none on this path). A driver that restarts (`--resume`) uploads everything
  once. Deletions were never mirrored by Ray's copy either.
- `state_period(n)`: the experiment state (one file whose size grows with the trials) is saved every
  max(10 s, 0.2 s per planned trial): 10 s at 50 trials, 5 minutes at the paper grid's 1,512. A driver
  killed between two saves restores an older state: trials finished since are continued from their
  own checkpoints (at-least-once, as before), never lost. `TUNE_GLOBAL_CHECKPOINT_S` set by the user wins.

Driver-side only: the trials' checkpoints are uploaded by Ray Train's own code, which this leaves alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("mmlg_ray")
PERIOD_ENV = "TUNE_GLOBAL_CHECKPOINT_S"
USER_PERIOD = os.environ.get(PERIOD_ENV)  # the user's own setting, as this process started
S_PER_TRIAL = 0.2
_lock = threading.Lock()
# (local folder, filesystem type, destination) -> {relative path: (mtime, size) last uploaded}; folders made
_sent: dict[tuple[str, str, str], dict[str, tuple[int, int]]] = {}
_dirs: dict[tuple[str, str, str], set[str]] = {}


def state_period(n_trials: int) -> float:
    return max(10.0, S_PER_TRIAL * n_trials)


@contextlib.contextmanager
def state_period_set(n_trials: int):
    """Around the Tune runs of `n_trials` planned trials (Tune's controller reads the period as it starts);
    the environment is as before afterwards, so a later job this process starts is not held to it."""
    if USER_PERIOD is not None:
        yield
        return
    before = os.environ.get(PERIOD_ENV)
    os.environ[PERIOD_ENV] = f"{state_period(n_trials):g}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PERIOD_ENV, None)
        else:
            os.environ[PERIOD_ENV] = before


def upload_changed(local_path: str, fs, fs_path: str, exclude=None) -> None:
    """Ray's `_upload_to_fs_path`, sending only what changed since the last upload of `local_path` to
    (fs, fs_path) by this process."""
    from ray.train._internal import storage as ray_storage

    if exclude or not os.path.isdir(local_path):
        return ray_storage._upload_to_fs_path(local_path=local_path, fs=fs, fs_path=fs_path, exclude=exclude)
    key = (os.path.realpath(local_path), fs.type_name, fs_path)
    with _lock:
        sent = _sent.setdefault(key, {})
        dirs = _dirs.setdefault(key, set())
    todo = []
    for root, _, files in os.walk(local_path):
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed while walking
                continue
            rel = os.path.relpath(path, local_path).replace(os.sep, "/")
            sig = (st.st_mtime_ns, st.st_size)
            if sent.get(rel) != sig:
                todo.append((path, rel, sig))
    for parent in sorted({posixpath.dirname(posixpath.join(fs_path, rel)) for _, rel, _ in todo} - dirs):
        fs.create_dir(parent, recursive=True)
        dirs.add(parent)

    def put(item):
        path, rel, sig = item
        try:
            src = open(path, "rb")
        except FileNotFoundError:  # removed since the walk: nothing to send (an error at the destination raises)
            return
        with src, fs.open_output_stream(posixpath.join(fs_path, rel)) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        with _lock:
            sent[rel] = sig

    if len(todo) == 1:
        put(todo[0])
    elif todo:
        with ThreadPoolExecutor(min(16, len(todo))) as pool:
            list(pool.map(put, todo))  # an error is raised here, as Ray's copy raises it


def incremental_uploads() -> None:
    """Make Tune's experiment syncer (`_FilesystemSyncer`, driver side) upload changed files only."""
    from ray.train._internal.storage import _FilesystemSyncer

    def _sync_up_command(self, local_path, uri, exclude=None):
        return upload_changed, dict(local_path=local_path, fs=self.storage_filesystem, fs_path=uri, exclude=exclude)

    _FilesystemSyncer._sync_up_command = _sync_up_command
