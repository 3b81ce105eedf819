"""Trial checkpoints on the output store, kept without forcing experiment syncs.

Tune's own pruning (`CheckpointConfig(num_to_keep=N)`) deletes a trial's older checkpoint the moment a
newer one registers, and to keep its saved experiment state from naming a deleted one it forces a
blocking upload of the whole experiment folder every N checkpoints of a trial
(ray/tune/execution/experiment_state.py, `on_trial_checkpoint`). At the paper grid that is about
13,600 uploads of a folder that grows with every trial: syncing quadratic in the trials. And it does
not close the gap: a driver killed between the deletion and the next save leaves a state that restores
the trial from a checkpoint that no longer exists ("does not exist on storage anymore"), and every
retry of that trial fails the same way.

So the trials run with `num_to_keep=None` (Tune deletes nothing and forces nothing; it saves its
state on its own period, `TUNE_GLOBAL_CHECKPOINT_S`), and:

- `CheckpointPruner`, a Tune callback, turns each older checkpoint of a trial into a *tombstone* as
  soon as a newer one registers: its weights are deleted, its folder stays with one small file,
  `superseded.json`. Storage holds one full checkpoint per live trial, as before.
- A trial restored from a tombstone (the saved state was older than the trial) resumes from the
  newest full checkpoint in its own folder (`resolve`): never from a deleted one, never from step 0.
- Once an experiment has ended and Tune has saved its final state, `drop_finished` deletes the
  checkpoints of its finished trials, which no restore will read; an errored trial keeps its latest,
  which `--resume` retries from.

Small per-trial operations only: a listing of the trial's folder, one delete and one small write per
checkpoint; nothing grows with the number of trials.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re

from ray.tune import Callback

log = logging.getLogger("mmlg_ray")
TOMBSTONE = "superseded.json"
_NAME = re.compile(r"^checkpoint_(\d+)$")


def _index(path: str) -> int | None:
    m = _NAME.match(posixpath.basename(path.rstrip("/")))
    return int(m.group(1)) if m else None


def _siblings(fs, trial_dir: str) -> list[tuple[int, str]]:
    """(index, path) of the checkpoint folders in a trial's folder, newest first."""
    from pyarrow import fs as pafs

    found = []
    for info in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
        i = _index(info.path)
        if i is not None and info.type == pafs.FileType.Directory:
            found.append((i, info.path))
    return sorted(found, reverse=True)


def _exists(fs, path: str) -> bool:
    from pyarrow import fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def bury(fs, path: str, by: str) -> None:
    """Make checkpoint folder `path` a tombstone naming `by`: the marker first, then every other file,
    so a reader sees either the full checkpoint or the marker."""
    from pyarrow import fs as pafs

    with fs.open_output_stream(posixpath.join(path, TOMBSTONE)) as f:
        f.write(json.dumps({"superseded_by": posixpath.basename(by.rstrip("/"))}).encode())
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File and posixpath.basename(info.path) != TOMBSTONE:
            fs.delete_file(info.path)


def resolve(fs, path: str, payload: str) -> str | None:
    """The checkpoint folder a trial restored from `path` resumes from: `path` itself if it holds
    `payload`, else (a tombstone) the newest folder beside it that does; None if there is none."""
    if not _exists(fs, posixpath.join(path, TOMBSTONE)):
        return path
    for _, p in _siblings(fs, posixpath.dirname(path.rstrip("/"))):
        if _exists(fs, posixpath.join(p, payload)) and not _exists(fs, posixpath.join(p, TOMBSTONE)):
            log.info("checkpoint %s was superseded: resuming from %s", path, p)
            return p
    return None


class CheckpointPruner(Callback):
    """Buries a trial's older checkpoints once a newer one is registered (see the module's text).
    Stateless: it lists the trial's folder, so a restored run buries what the killed one left."""

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        fs, path = checkpoint.filesystem, checkpoint.path
        new = _index(path)
        if new is None:
            return
        for i, p in _siblings(fs, posixpath.dirname(path.rstrip("/"))):
            if i < new and not _exists(fs, posixpath.join(p, TOMBSTONE)):
                try:
                    bury(fs, p, path)
                except OSError as e:  # a failed deletion costs storage, not correctness
                    log.warning("could not prune checkpoint %s: %s", p, e)


def drop_finished(grid) -> int:
    """Delete every checkpoint of the finished (not errored) trials of an ended experiment whose final
    state Tune has saved; return how many folders went."""
    n = 0
    for res in grid:
        if res.error is not None or res.filesystem is None or not res.path:
            continue
        for _, p in _siblings(res.filesystem, res.path):
            try:
                res.filesystem.delete_dir(p)
                n += 1
            except OSError as e:
                log.warning("could not delete checkpoint %s: %s", p, e)
    return n
