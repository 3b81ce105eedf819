"""The pre-training stage on object storage (a real S3 server on loopback: the session's `s3` fixture) as
resumable work: each shape is written to storage as it finishes, one failure does not discard the
others, a rerun reuses every finished shape, and a task whose process dies resumes from its checkpoint there. The whole job with its output on S3, resumed there, is
test_two_nodes'."""

import io
import json
import uuid

import pandas as pd
import pytest


def _parquet(s3, key) -> pd.DataFrame:
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    return pd.read_parquet(io.BytesIO(body))


def test_pretrain_stage_writes_each_shape_and_a_rerun_reuses_the_finished_ones(
    tiny_cfg, tiny_ancestor, ray_address, s3, tmp_path, monkeypatch
):
    """Each pre-training task writes its shape to the bucket itself (weights, then the sidecar with
    its cost and content hash); the driver never holds a pre-trained state."""
    from mmlg_ray.distributed.sweep import RayExecutor
    from mmlg_ray.engine.job import pretrain_jobs, split_pretraining
    from mmlg_ray.engine.pipeline import shape_key
    from mmlg_ray.storage import OutputDir

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.descendants.grid.method = ["pt_ft"]
    cfg.descendants.grid.width = [64, 128]  # two shapes
    cfg.ray.tune.trial_cpus = 1.0
    key = f"pretrain/{uuid.uuid4().hex[:8]}"
    od = OutputDir(f"s3://{s3.bucket}/{key}", tmp_path / "staging")
    jobs = pretrain_jobs(cfg, tiny_ancestor.spec, od)
    narrow, wide = [shape_key(j.spec) for j in jobs]
    monkeypatch.setenv("MMLG_FAIL_PRETRAIN", f"pt_ft/{narrow}")  # its task raises on every attempt
    done, failed = RayExecutor().start_pretraining(cfg, tiny_ancestor, None, jobs, wait=False).wait()
    assert [n for n, _ in failed] == [f"pt_ft/{narrow}@1x"] and list(done) == [f"pt_ft/{wide}@1x"]
    assert "injected failure" in str(failed[0][1])
    # (a "folder/" marker is what pyarrow leaves when it deletes a folder's last file: the checkpoint's)
    written = [k for k in s3.keys(key) if not k.endswith("/")]
    assert sorted(k.rsplit(".", 1)[-1] for k in written) == ["json", "safetensors"]
    assert all(f"/pretrained/pt_ft-{wide}-1x-" in k for k in written)  # the finished shape is there, the failed not
    before = {o["Key"]: o["LastModified"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=key)["Contents"]}
    before = {k: t for k, t in before.items() if not k.endswith("/")}
    stored = json.loads(
        s3.client.get_object(Bucket=s3.bucket, Key=next(k for k in before if k.endswith(".json")))["Body"].read()
    )
    assert stored["ref"]["uri"].startswith(f"s3://{s3.bucket}/{key}/pretrained/") and len(stored["ref"]["sha256"]) == 64
    assert stored == done[f"pt_ft/{wide}@1x"]  # what the task returned is what it wrote

    monkeypatch.delenv("MMLG_FAIL_PRETRAIN")
    fresh = OutputDir(od.target, tmp_path / "other-machine")  # e.g. a new head node: nothing staged
    reused, todo = split_pretraining(pretrain_jobs(cfg, tiny_ancestor.spec, fresh))
    assert list(reused) == [f"pt_ft/{wide}@1x"] and [shape_key(j.spec) for j in todo] == [narrow]
    assert reused[f"pt_ft/{wide}@1x"]["cost"] == stored["cost"]  # its measured cost is the first run's
    # this time its task's process dies (SIGKILL, as when its node is reclaimed) right after its step-5
    # checkpoint in the bucket: Ray runs the task again, which resumes there
    cfg.descendants.pretrain_checkpoint_every = 5
    cfg.ray.max_failures = 1
    monkeypatch.setenv("MMLG_KILL_PRETRAIN_AT_STEP", "5")
    done, failed = RayExecutor().start_pretraining(cfg, tiny_ancestor, None, todo, wait=True).wait()
    assert not failed and list(done) == [f"pt_ft/{narrow}@1x"]
    cost, whole = done[f"pt_ft/{narrow}@1x"]["cost"], stored["cost"]  # the wide shape ran without a break
    assert cost["resumed_from_step"] == 5 and whole["resumed_from_step"] == 0
    # the loss counted as what it was to Ray (a worker gone without a drain): a retry, in the shape's cost
    assert (cost["retries"], cost["preemptions"], whole["retries"], whole["preemptions"]) == (1, 0, 0, 0)
    # the work the killed attempt did after its step-5 checkpoint was lost, and is charged; the other lost none
    assert 0 < cost["lost_device_s"] < 60 and whole["lost_device_s"] == 0
    # the whole run's steps and samples, and the schedule continued where it stopped
    assert cost["steps"] == whole["steps"] == cfg.descendants.pretrain_steps and cost["samples"] == whole["samples"]
    assert cost["final_lr"] == whole["final_lr"]
    after = {o["Key"]: o["LastModified"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=key)["Contents"]}
    after = {k: t for k, t in after.items() if not k.endswith("/")}
    # reused, not written again; the checkpoint deleted once its shape was written
    assert len(after) == 4 and all(after[k] == t for k, t in before.items())
    assert not [k for k in after if k.endswith(".ckpt.pt")]


def test_a_pretraining_task_lost_with_its_worker_is_retried_max_failures_times(ray_address, tmp_path):
    """The driver's own retries (the tasks run with max_retries=0): a worker that dies is a retry, each
    attempt gets the counts so far, and after ray.max_failures of them the shape fails for good; an
    error of the task's own code is not retried."""
    import os

    import ray

    from mmlg_ray.distributed.pretraining import PretrainingWatch, note_attempt

    @ray.remote(num_cpus=0, max_retries=0)
    def shape(name, restarts, log):
        note_attempt(restarts)
        with open(log, "a") as f:
            f.write(f"{name} {restarts['retries']}\n")
        if name == "crashes" or (name == "crashes once" and restarts["retries"] == 0):
            os._exit(1)  # the worker process dies: Ray reports WorkerCrashedError
        if name == "raises":
            raise ValueError("a bug in the task")
        return restarts

    log = tmp_path / "attempts"
    names = ["crashes", "crashes once", "raises"]
    watch = PretrainingWatch(names, lambda n, r: shape.remote(n, r, str(log)), {}, max_failures=2)
    done, failed = watch.wait()
    (last,) = done["crashes once"].pop("losses")  # when its lost attempt started and was lost, for the charge
    assert done["crashes once"].pop("attempt_key").startswith("pretrain-attempt-")
    assert done == {"crashes once": {"preemptions": 0, "retries": 1}} and last[0] <= last[1]
    assert {n: type(e).__name__ for n, e in failed} == {
        "crashes": "WorkerCrashedError",
        "raises": "RayTaskError(ValueError)",
    }
    attempts = sorted(log.read_text().splitlines())
    assert attempts == ["crashes 0", "crashes 1", "crashes 2", "crashes once 0", "crashes once 1", "raises 0"]
    assert watch.restarts["crashes"] == {"preemptions": 0, "retries": 2}


@pytest.mark.parametrize("method,precision", [("pt_ft", "fp32"), ("csm", "bf16")])
def test_a_pretraining_resumes_from_its_checkpoint_and_a_bad_one_starts_again(
    tiny_cfg, tiny_ancestor, tmp_path, caplog, method, precision
):
    """The checkpoints of one shape's pre-training (no Ray: the file the Ray task writes to the output
    store): a run stopped after its step-4 checkpoint continues from step 4 with its schedule and
    counts whole; a checkpoint that does not load is set aside with a warning and the run starts over.
    Both pre-training methods, csm in bf16 (its snapshot holds the fp32 master weights and AdamW state)."""
    from dataclasses import replace

    import torch

    from mmlg_ray.engine.job import pretrain_checkpointing
    from mmlg_ray.engine.pipeline import pretrain_descendant
    from mmlg_ray.method.descend import descendant_spec

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.descendants.pretrain_checkpoint_every = 4
    cfg.precision = precision
    spec = descendant_spec(tiny_ancestor.spec, 2, 64)
    path = tmp_path / "shape.ckpt.pt"

    class Stop(Exception):
        pass

    def stop_at_4(step, start):
        if step == 4:
            raise Stop

    saved = []
    ckpt = pretrain_checkpointing(cfg, str(path))
    first = replace(ckpt, save=lambda snap: (saved.append(snap["step"]), ckpt.save(snap)), after_save=stop_at_4)
    with pytest.raises(Stop):
        pretrain_descendant(cfg, tiny_ancestor, method, spec, checkpoint=first)
    assert saved == [4] and torch.load(path, weights_only=True)["step"] == 4
    _, resumed = pretrain_descendant(
        cfg, tiny_ancestor, method, spec, checkpoint=pretrain_checkpointing(cfg, str(path))
    )
    _, whole = pretrain_descendant(cfg, tiny_ancestor, method, spec)  # no checkpoints, never stopped
    assert resumed["resumed_from_step"] == 4 and whole["resumed_from_step"] == 0
    assert resumed["steps"] == whole["steps"] == 10 and resumed["samples"] == whole["samples"]
    assert resumed["final_lr"] == pytest.approx(whole["final_lr"])  # the schedule went on from step 4
    assert resumed["wall_s"] > torch.load(path, weights_only=True)["seconds"] > 0  # both attempts' time

    path.write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING", logger="mmlg_ray"):
        _, again = pretrain_descendant(
            cfg, tiny_ancestor, method, spec, checkpoint=pretrain_checkpointing(cfg, str(path))
        )
    assert again["resumed_from_step"] == 0 and again["steps"] == 10
    assert "does not load" in caplog.text and str(path) in caplog.text


def test_a_resumed_loop_starts_from_the_checkpoints_weights_optimizer_and_schedule(tiny_cfg, tiny_ancestor, caplog):
    """checkpointed_loop itself: a loop resumed from a snapshot (into a model initialized otherwise)
    holds, before its first step, the snapshot's weights, AdamW's moments and step count and the
    schedule's learning rate; a snapshot of another shape is refused before any tensor is copied."""
    import torch

    from mmlg_ray.config import TrainConfig
    from mmlg_ray.method.descend import descendant_spec
    from mmlg_ray.method.models import build_model
    from mmlg_ray.method.pretrain import Checkpointing, checkpointed_loop, corpus
    from mmlg_ray.method.train import TorchEngine, contrastive_step

    spec = descendant_spec(tiny_ancestor.spec, 2, 64)
    data = corpus(tiny_cfg)
    tcfg = TrainConfig(steps=8, batch_size=16, lr=1e-3, weight_decay=0.1, warmup_steps=2, log_every=4)

    def engine(seed, s=spec):
        torch.manual_seed(seed)
        return TorchEngine(build_model(s, "image_text"), tcfg)

    def batches(start):
        return data.batches(16, spec.image_size, spec.context_length, seed=start)

    class Stop(Exception):
        pass

    def stop(step, start):
        raise Stop

    first, saved = engine(0), {}
    with pytest.raises(Stop):
        checkpointed_loop(
            first, batches, contrastive_step(first.module), 8, Checkpointing(4, lambda: None, saved.update, stop),
            log_every=4, name="t",
        )  # fmt: skip
    lr_at_4 = first.optimizer.param_groups[0]["lr"]
    moments = {k: v["exp_avg"].clone() for k, v in first.optimizer.state_dict()["state"].items()}

    second, seen = engine(1), {}  # other initial weights, a fresh optimizer

    def batches_seen(start):  # called once the snapshot is loaded, before the first step
        opt = second.optimizer.state_dict()
        seen.update(
            start=start,
            weights=all(torch.equal(v, saved["model"][k]) for k, v in second.module.state_dict().items()),
            adam_steps={int(s["step"]) for s in opt["state"].values()},
            moments=all(torch.equal(opt["state"][k]["exp_avg"], m) for k, m in moments.items()),
            lr=second.optimizer.param_groups[0]["lr"],
        )
        return batches(start)

    res = checkpointed_loop(
        second, batches_seen, contrastive_step(second.module), 8, Checkpointing(4, lambda: saved, lambda s: None),
        log_every=4, name="t",
    )  # fmt: skip
    assert seen == {"start": 4, "weights": True, "adam_steps": {4}, "moments": True, "lr": lr_at_4}
    assert (res.resumed_from, res.steps) == (4, 8)

    wide = descendant_spec(tiny_ancestor.spec, 2, 128)
    other = engine(2, wide)
    with caplog.at_level("WARNING", logger="mmlg_ray"):
        res = checkpointed_loop(
            other, lambda start: data.batches(16, wide.image_size, wide.context_length, seed=start),
            contrastive_step(other.module), 1, Checkpointing(4, lambda: saved, lambda s: None), log_every=1, name="t",
        )  # fmt: skip
    assert res.resumed_from == 0 and "another model's tensors" in caplog.text  # same names, other shapes


def test_the_work_lost_attempts_threw_away_is_counted_once_from_their_checkpoint():
    """lost_seconds: the attempt that saved the checkpoint lost what it did after the save; an attempt
    that saved none lost everything since its start; losses the checkpoint's own attempt had charged
    are not charged again."""
    from mmlg_ray.engine.pretraining import lost_seconds

    losses = [[0.0, 50.0], [60.0, 70.0], [80.0, 95.0]]  # three lost attempts: [started at, lost at]
    assert lost_seconds([], None) == 0.0
    assert lost_seconds(losses, None) == 50 + 10 + 15  # no checkpoint: every attempt lost all it did
    # the first attempt saved at 40 (nothing charged before it): it lost 10 s; the next two all of theirs
    assert lost_seconds(losses, {"saved_at": 40.0, "lost_s": 0.0}) == 10 + 10 + 15
    # the second saved at 65 after charging the first's 10 s: 10 + (70 - 65) + 15
    assert lost_seconds(losses, {"saved_at": 65.0, "lost_s": 10.0}) == 10 + 5 + 15
    # a checkpoint of the attempt now running (every loss before it, charged by it): only what it recorded
    assert lost_seconds(losses, {"saved_at": 99.0, "lost_s": 35.0}) == 35
    # a clock a little off never charges a negative time
    assert lost_seconds([[10.0, 9.0]], None) == 0.0
