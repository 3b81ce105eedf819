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
state on its own period, which .syncing sets and makes incremental), and:

- `CheckpointPruner`, a Tune callback, turns each older checkpoint of a trial into a *tombstone* as
  soon as a newer one registers: its weights are deleted, its folder stays with one small file,
  `superseded.json`. Storage holds one full checkpoint per live trial, as before.
- A trial restored from a tombstone (the saved state was older than the trial) resumes from the
  newest full checkpoint in its own folder that loads (`candidates`): never from a deleted one, never
  from step 0 while one exists.
- Once an experiment has ended and Tune has saved its final state, `drop_finished` deletes the
  checkpoints of its finished trials, which no restore will read; an errored trial keeps its latest,
  which `--resume` retries from.

Per checkpoint, small operations on the trial's own folder only: a listing of it and of each of its
checkpoint folders (one per evaluation so far), the deletions, one small write. Nothing grows with the
number of trials.
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


def _holds_files(fs, path: str) -> bool:
    """The folder holds something besides a tombstone marker (weights, or part of them)."""
    from pyarrow import fs as pafs

    return any(
        i.type == pafs.FileType.File and posixpath.basename(i.path) != TOMBSTONE
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
    )


def candidates(fs, path: str, payload: str) -> list[str]:
    """The checkpoint folders a trial restored from `path` may resume from, best first: `path` itself
    if it is not a tombstone; else every full folder beside it (holding `payload`, no marker), newest
    first. A reader tries them in turn: a folder the killed run was still writing (Tune never registered
    it) may hold a truncated file. Empty: start from step 0."""
    if not _exists(fs, posixpath.join(path, TOMBSTONE)):
        return [path]
    return [
        p
        for _, p in _siblings(fs, posixpath.dirname(path.rstrip("/")))
        if _exists(fs, posixpath.join(p, payload)) and not _exists(fs, posixpath.join(p, TOMBSTONE))
    ]


class CheckpointPruner(Callback):
    """Keeps one full checkpoint per trial: the one just registered (see the module's text).

    Stateless: it lists the trial's folder, so a restored run buries what the killed one left. A trial
    restored from a stale state counts its checkpoints on from the one that state names, so its next
    one may land in a folder the killed run had already buried: the marker there is removed, and every
    other folder still holding files is buried, whatever its number."""

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        try:  # an error here would keep Tune from registering the checkpoint: log it, never raise
            fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
            if _index(path) is None:
                return
            marker = posixpath.join(path, TOMBSTONE)
            if _exists(fs, marker):
                fs.delete_file(marker)
            for _, p in _siblings(fs, posixpath.dirname(path)):
                if p.rstrip("/") != path and _holds_files(fs, p):
                    bury(fs, p, path)
        except Exception as e:  # noqa: BLE001 (a failed deletion costs storage, not correctness)
            log.warning("could not prune the checkpoints beside %s: %s", getattr(checkpoint, "path", "?"), e)


def drop_finished(grid) -> int:
    """Delete every checkpoint of the finished (not errored) trials of an ended experiment whose final
    state Tune has saved, a multi-worker trial's own Ray Train run (`<storage>/ft-<trial id>`)
    included; return how many folders went."""
    n = 0
    for res in grid:
        if res.error is not None or res.filesystem is None or not res.path:
            continue
        trial_id = (res.metrics or {}).get("trial_id")
        storage = posixpath.dirname(posixpath.dirname(res.path.rstrip("/")))
        folders = [p for _, p in _siblings(res.filesystem, res.path)]
        if trial_id:  # Ray Train names its checkpoints checkpoint_<date>, not checkpoint_<index>
            folders += _checkpoint_dirs(res.filesystem, posixpath.join(storage, f"ft-{trial_id}"))
        for p in folders:
            try:
                res.filesystem.delete_dir(p)
                n += 1
            except OSError as e:
                log.warning("could not delete checkpoint %s: %s", p, e)
    return n


def _checkpoint_dirs(fs, folder: str) -> list[str]:
    """Every `checkpoint_*` folder in `folder` (any suffix)."""
    from pyarrow import fs as pafs

    return [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith("checkpoint_")
    ]
