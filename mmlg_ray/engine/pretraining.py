"""The pre-training stage's units, written once (no Ray): one PretrainJob per descendant shape that pt_ft
or csm pre-trains, named by what it depends on; each written to the output store as soon as it is done
(weights, then a sidecar), checkpointed there on the way and resumed from there when run again; a
rerun reuses every shape already written."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from mmlg_ray.engine import artifacts as art
from mmlg_ray.config import Config, ModelSpec
from mmlg_ray.storage import OutputDir

log = logging.getLogger("mmlg_ray")


@dataclass(frozen=True)
class PretrainJob:
    """One pre-trained descendant shape: weights at `base`.safetensors, cost and reference at `base`.json."""

    method: str
    spec: ModelSpec
    budget: float
    name: str  # pretrain_name: its row in stages.parquet
    base: str  # the output store's URI or path, without suffix

    @property
    def weights(self) -> str:
        return self.base + ".safetensors"

    @property
    def sidecar(self) -> str:
        return self.base + ".json"

    @property
    def checkpoint(self) -> str:  # while it pre-trains
        return self.base + ".ckpt.pt"


def pretrain_fingerprint(cfg: Config) -> str:
    """What a pre-trained shape depends on: the ancestor, the corpus, the extraction's budget and
    optimizer (its 1x budget), pretrain_steps, seed, precision; not the elastic extraction's settings."""
    from mmlg_ray.engine.pipeline import _fingerprint_of

    dumped = cfg.model_dump(mode="json")
    for name in ("elastic_weight", "elastic_shapes"):
        dumped["learngene"]["extraction"].pop(name, None)
    return _fingerprint_of(
        dumped, ("ancestor", "data.corpus", "learngene.extraction", "descendants.pretrain_steps", "seed", "precision")
    )


def pretrain_jobs(cfg: Config, ancestor_spec: ModelSpec, od: OutputDir) -> list[PretrainJob]:
    from mmlg_ray.engine.pipeline import needs_pretraining, pretrain_name, shape_key

    fp = pretrain_fingerprint(cfg)
    return [
        PretrainJob(m, s, b, pretrain_name(m, s, b), od.uri(f"pretrained/{m}-{shape_key(s)}-{b:g}x-{fp}"))
        for m, s, b in needs_pretraining(cfg, ancestor_spec)
    ]


def pretrain_and_write(
    cfg: Config,
    ancestor,
    job: PretrainJob,
    device=None,
    hold_s: float = 0.0,
    kill_at: int = 0,
    restarts: dict | None = None,
) -> dict:
    """Pre-train one shape and write it to the output store (weights, then the sidecar with its cost
    and content hash: a reader that sees the sidecar sees a complete artifact). Returns the sidecar.
    On the way it checkpoints to the output store (`job.checkpoint`, every
    descendants.pretrain_checkpoint_every steps) and, run again after its process or node was lost,
    resumes from there; the checkpoint is deleted once the shape is written. `kill_at` (tests): the
    process kills itself, as a reclaimed node ends it, after its first checkpoint at or past that step.
    `restarts`: the earlier attempts lost to a preemption or a failure ({"preemptions": n, "retries": n,
    "losses": [[started at, lost at], ...]}, from the Ray driver), kept in the cost with the work they
    threw away (`lost_device_s`, lost_seconds)."""
    import torch
    from safetensors.torch import save_file

    from mmlg_ray import storage as stor
    from mmlg_ray.engine.pipeline import pretrain_descendant

    done = art.read_sidecar(job.sidecar)
    if done is not None:  # a retry of a task whose node was lost after it wrote the shape: nothing to redo
        if stor.exists(job.checkpoint):
            stor.remove(job.checkpoint)
        return done
    started = time.time()
    losses = (restarts or {}).get("losses") or []
    lost: dict = {}  # "s": the work earlier attempts threw away, charged when the checkpoint is read
    ckpt = pretrain_checkpointing(cfg, job.checkpoint, kill_at, losses, lost)
    state, cost = pretrain_descendant(cfg, ancestor, job.method, job.spec, device, budget=job.budget, checkpoint=ckpt)
    if hold_s:  # tests (MMLG_HOLD_PRETRAIN_S, read by the driver): a shape that takes this much longer
        time.sleep(hold_s)
    cost = {**cost, "started_at": started, "ended_at": time.time()}  # wall clock: the job's stage timeline
    cost.update({k: int((restarts or {}).get(k, 0)) for k in ("preemptions", "retries")})
    cost["lost_device_s"] = lost.get("s", lost_seconds(losses, None))  # one device per task, as device_s
    with stor.writing(job.weights) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        sha = art.file_sha256(tmp)
    del state
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    side = {"cost": cost, "ref": art.ArtifactRef(job.weights, sha).to_json(), "name": job.name}
    art.write_sidecar(job.sidecar, side)
    if stor.exists(job.checkpoint):
        stor.remove(job.checkpoint)
    log.info("pretrain %s: wrote %s", job.name, job.weights)
    return side


def lost_seconds(losses: list, snap: dict | None) -> float:
    """Seconds of work that the lost attempts of a pre-training threw away. losses: [started at, lost at]
    of each lost attempt this driver saw (wall clock); snap: the checkpoint this attempt resumes from,
    which records when it was saved (`saved_at`) and the loss charged by the attempt that saved it
    (`lost_s`, every loss before that attempt). A loss before the save was charged there; the attempt
    that saved it (started before the save, lost after) lost what it did after the save; a later one
    lost everything since its start. A driver's later run sees only its own losses: the ones before the
    checkpoint are in it, the ones after, of an earlier driver, are not counted."""
    done, saved = (float(snap.get("lost_s", 0.0)), snap.get("saved_at")) if snap else (0.0, None)
    total = done
    for started, lost_at in losses:
        if saved is not None and lost_at <= saved:
            continue  # charged by the attempt that saved the checkpoint
        since = max(started, float(saved)) if saved is not None else started
        total += max(0.0, lost_at - since)
    return total


def pretrain_checkpointing(cfg: Config, path: str, kill_at: int = 0, losses: list | None = None, lost=None):
    """A pre-training's checkpoints in one file of the output store (a path or a URI), replaced whole
    each time (written to a temporary name, then renamed or uploaded). One that does not load (another
    version's) is set aside with a warning and the shape starts again. losses, lost: the earlier
    attempts' [started at, lost at] and a dict whose "s" is set, once the checkpoint is read, to the
    seconds they threw away (lost_seconds); each checkpoint saved records its time and that loss, for
    a later attempt's count."""
    import io

    import torch

    from mmlg_ray import storage as stor
    from mmlg_ray.method.pretrain import Checkpointing

    losses = list(losses or [])
    lost = lost if lost is not None else {}

    def read():
        if not stor.exists(path):
            return None
        raw = stor.read_bytes(path)  # a storage error raises: the task fails and is retried, the file kept
        try:
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a file that is not a checkpoint: start again, say so
            log.warning("pretrain: checkpoint %s does not load (%s); starting from step 0", path, e)
            return None

    def load():
        snap = read()
        lost["s"] = lost_seconds(losses, snap)
        return snap

    def save(snap: dict):
        snap = {**snap, "saved_at": time.time(), "lost_s": lost.get("s", 0.0)}
        with stor.writing(path) as tmp:
            torch.save(snap, str(tmp))

    def after_save(step: int, start: int):
        if kill_at and start == 0 and step >= kill_at:
            import signal

            log.warning("pretrain: killing this process after the step-%d checkpoint (kill_at, tests)", step)
            os.kill(os.getpid(), signal.SIGKILL)

    every = cfg.descendants.pretrain_checkpoint_every or cfg.learngene.extraction.checkpoint_every
    return Checkpointing(every, load, save, after_save)


def split_pretraining(jobs: list[PretrainJob]) -> tuple[dict, list[PretrainJob]]:
    """(sidecars of the shapes the output store already holds: reused, the jobs still to run)."""
    reused = {j.name: s for j in jobs if (s := art.read_sidecar(j.sidecar)) is not None}
    for n in reused:
        log.info("pretrain %s: reusing it", n)
    return reused, [j for j in jobs if j.name not in reused]
