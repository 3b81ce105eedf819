"""The main job on object storage (a real S3 server on loopback: the session's `s3` fixture), and the
pre-training stage as resumable work: each shape is written to storage as it finishes, one failure
does not discard the others, and a rerun reuses every finished shape."""

import io
import json
import uuid

import pandas as pd


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
    written = s3.keys(key)
    assert sorted(k.rsplit(".", 1)[-1] for k in written) == ["json", "safetensors"]
    assert all(f"/pretrained/pt_ft-{wide}-1x-" in k for k in written)  # the finished shape is there, the failed not
    before = {o["Key"]: o["LastModified"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=key)["Contents"]}
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
    done, failed = RayExecutor().start_pretraining(cfg, tiny_ancestor, None, todo, wait=True).wait()
    assert not failed and list(done) == [f"pt_ft/{narrow}@1x"]
    after = {o["Key"]: o["LastModified"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=key)["Contents"]}
    assert len(after) == 4 and all(after[k] == t for k, t in before.items())  # reused, not written again


def test_sweep_with_its_output_on_s3(tiny_overrides, ray_address, s3):
    """--output s3://bucket/run: learngene, tables, report and Ray's checkpoints land in the bucket (the
    pre-trained shapes' writes are the test above's); an interrupted experiment there needs --resume
    (exit 2 without), which reuses it."""
    from jobs import sweep as sweep_job

    key = f"runs/{uuid.uuid4().hex[:8]}"
    uri = f"s3://{s3.bucket}/{key}"
    sets = tiny_overrides + [
        f"ray.address={ray_address}",
        "descendants.grid.method=[mmlg]",
        "descendants.seeds=[0]",
        "ray.tune.num_samples=1",
        "ray.num_workers=1",
    ]
    argv = ["--output", uri] + sum((["--set", s] for s in sets), [])
    assert sweep_job.main(argv) == 0
    keys = s3.keys(key + "/")
    files = {k[len(key) + 1 :] for k in keys}
    for name in (
        "config.yaml",
        "ancestor.json",
        "experiment.json",
        "trials.parquet",
        "history.parquet",
        "stages.parquet",
        "report/report.html",
        "report/report.md",
        "report/cost.parquet",
    ):
        assert name in files, sorted(files)
    assert [f for f in files if f.startswith("learngenes/mmlg-") and f.endswith(".safetensors")]
    # Ray Train's ZeRO checkpoints, Ray Tune's experiment state and the trial's own checkpoint (uploaded
    # by the trial's worker process) went to the bucket's ray/ folder; the trial finished, so its
    # checkpoint was deleted there once the experiment's final state was saved
    assert [f for f in files if f.startswith("ray/extract-mmlg-") and "/checkpoint_" in f]
    assert [f for f in files if f.startswith("ray/sweep-") and "experiment_state" in f]
    (rj,) = [f for f in files if f.startswith("ray/sweep-") and f.endswith("/result.json")]
    body = s3.client.get_object(Bucket=s3.bucket, Key=f"{key}/{rj}")["Body"].read().decode()
    reported = [json.loads(line).get("checkpoint_dir_name") for line in body.splitlines() if line.strip()]
    assert reported[0] == "checkpoint_000000"  # the first evaluation's, persisted to the bucket
    assert not [f for f in files if f.startswith("ray/sweep-") and "/checkpoint_" in f]
    trials = _parquet(s3, f"{key}/trials.parquet")
    assert len(trials) == 1 and set(trials.method) == {"mmlg"} and (trials.status == "finished").all()
    stages = _parquet(s3, f"{key}/stages.parquet")
    assert stages[stages.stage == "extraction"].artifact.str.startswith(f"{uri}/learngenes/").all()
    html = s3.client.get_object(Bucket=s3.bucket, Key=f"{key}/report/report.html")["Body"].read().decode()
    from mmlg_ray.method.learngene import load_learngene

    sha = load_learngene(stages[stages.stage == "extraction"].artifact.iloc[0]).meta.tensors_sha256
    assert sha in html  # provenance read the learngene from S3

    # the driver "dies" after the sweep but before its tables: an interrupted experiment in the bucket
    lg_key = next(k for k in keys if "/learngenes/" in k)
    lg_time = s3.client.head_object(Bucket=s3.bucket, Key=lg_key)["LastModified"]
    for name in ("trials.parquet", "history.parquet", "stages.parquet"):
        s3.client.delete_object(Bucket=s3.bucket, Key=f"{key}/{name}")
    assert sweep_job.main(argv) == 2  # refused: it needs --resume (or a fresh start)
    assert sweep_job.main(argv + ["--resume"]) == 0
    again = _parquet(s3, f"{key}/trials.parquet")
    assert sorted(again.trial_id) == sorted(trials.trial_id)  # the finished trials, restored, not run again
    assert s3.client.head_object(Bucket=s3.bucket, Key=lg_key)["LastModified"] == lg_time  # learngene reused
