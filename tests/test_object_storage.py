"""The pre-training stage on object storage (a real S3 server on loopback: the session's `s3` fixture) as
resumable work: each shape is written to storage as it finishes, one failure does not discard the
others, and a rerun reuses every finished shape. The whole job with its output on S3, resumed there, is
test_two_nodes'."""

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
