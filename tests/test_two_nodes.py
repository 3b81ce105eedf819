"""The main job on a two-node Ray cluster with its output on S3 (tests/two_node_sweep.py, in a
subprocess; the session's S3 server). The second node runs in a mount namespace of its own, a private
tmpfs over /tmp and the cache folder, so nothing is read from another node's disk (the learngene is
consolidated by the driver from the checkpoint in S3, the trial reads its inputs by reference); where
`unshare --mount` is not allowed (not root) the nodes share the disk and that one check is left out.
The ZeRO extraction's two workers land on different nodes, crash once after step 6 and resume there
from their checkpoint in S3; the trial runs on the second node; learngene,
tables, report and Ray's checkpoints land in the bucket. Then the driver "dies" before its tables, and
on the session's own Ray (another cluster, as after a head replaced) the interrupted experiment in the
bucket needs --resume, which restores it without running a trial or an extraction again."""

import io
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow  # a Ray cluster of its own, in a subprocess
ROOT = Path(__file__).resolve().parents[1]


def _private_mounts() -> bool:
    """A mount namespace with a tmpfs of its own can be made here (root, or a kernel that lets users)."""
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /tmp"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _parquet(s3, key) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()))


def test_two_node_cluster_extracts_on_both_nodes_sweeps_to_s3_and_resumes_there(
    tiny_overrides, s3, ray_address, tmp_path
):
    from jobs import sweep as sweep_job
    from mmlg_ray.method.learngene import load_learngene

    private = _private_mounts()
    key = f"two-nodes/{uuid.uuid4().hex[:8]}"
    uri = f"s3://{s3.bucket}/{key}"
    sets = tiny_overrides + [
        "descendants.grid.method=[mmlg]",
        "descendants.seeds=[0]",
        "ray.tune.num_samples=1",
        "ray.num_workers=2",
        "ray.cpus_per_worker=1",
        "ray.extraction.zero_stage=2",
        "ray.tune.trial_resources={nodisk: 0.01}",  # the trial on the node that sees none of the head's files
    ]
    log = tmp_path / "two_nodes.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMLG_TWO_NODES_SHARED_DISK": "" if private else "1"}
    env["MMLG_FAIL_AT_STEP"] = "6"  # the extraction crashes once, after its step-6 checkpoint in S3
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/two_node_sweep.py"), uri, json.dumps(sets)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            env=env,
        )
        try:
            out, _ = proc.communicate(timeout=420)
        finally:
            if proc.poll() is None:  # only this subprocess's own cluster: its process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert len(res["nodes"]) == 2
    # 2 workers of 1 CPU on two 1-CPU nodes: one on each in each of the two attempts, as Ray's state API reports
    assert sorted(res["train_worker_nodes"]) == sorted(res["nodes"] * 2)
    assert res["trial_nodes"] == [res["nodisk"]]
    # a file the head's driver wrote in /tmp is not there for the second node (there, as the mode says, when
    # the nodes share the disk)
    assert res["nodisk_sees_the_heads_tmp"] is (not private)

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
    # both ranks' ZeRO shards in the one checkpoint in S3 (each rank wrote only its own shard)
    ckpt = [f for f in files if f.startswith("ray/extract-mmlg-") and "/checkpoint_" in f]
    for rank in (0, 1):  # DeepSpeed's per-rank optimizer shard, e.g. latest_zero/zero_pp_rank_1_mp_rank_00_...
        assert any(f"/zero_pp_rank_{rank}_" in f for f in ckpt), ckpt
    # Ray Tune's experiment state and the trial's own checkpoint (uploaded by the trial's worker process)
    # went to the bucket's ray/ folder; the trial finished, so its checkpoint was deleted there once the
    # experiment's final state was saved
    assert [f for f in files if f.startswith("ray/sweep-") and "experiment_state" in f]
    (rj,) = [f for f in files if f.startswith("ray/sweep-") and f.endswith("/result.json")]
    body = s3.client.get_object(Bucket=s3.bucket, Key=f"{key}/{rj}")["Body"].read().decode()
    reported = [json.loads(line).get("checkpoint_dir_name") for line in body.splitlines() if line.strip()]
    assert reported[0] == "checkpoint_000000"  # the first evaluation's, persisted to the bucket
    assert not [f for f in files if f.startswith("ray/sweep-") and "/checkpoint_" in f]
    trials = _parquet(s3, f"{key}/trials.parquet")
    assert len(trials) == 1 and set(trials.method) == {"mmlg"} and (trials.status == "finished").all()
    assert trials.final_score.notna().all()
    stages = _parquet(s3, f"{key}/stages.parquet")
    assert stages.set_index("stage").loc["extraction", "device_s"] > 0
    assert stages[stages.stage == "extraction"].artifact.str.startswith(f"{uri}/learngenes/").all()
    html = s3.client.get_object(Bucket=s3.bucket, Key=f"{key}/report/report.html")["Body"].read().decode()
    lg = load_learngene(stages[stages.stage == "extraction"].artifact.iloc[0])
    assert lg.meta.tensors_sha256 in html  # provenance read the learngene from S3
    cost = lg.meta.cost
    assert cost["steps"] == 12 and cost["zero_stage"] == 2
    # resumed on both nodes from the checkpoint in S3 (each rank its own ZeRO shard), not started again
    assert cost["resumed_from_step"] == 6
    ext = stages.set_index("stage").loc["extraction"]  # stages.parquet has Ray Train's count: a crash, a retry
    assert (ext.retries, ext.preemptions) == (1, 0) and ext.lost_device_s > 0
    assert cost["devices"] == 2 and {t.dtype for t in lg.tensors.values()} == {torch.float32}

    # the driver "dies" after the sweep but before its tables: an interrupted experiment in the bucket
    argv = ["--output", uri] + sum((["--set", s] for s in sets + [f"ray.address={ray_address}"]), [])
    lg_key = next(k for k in keys if "/learngenes/" in k)
    lg_time = s3.client.head_object(Bucket=s3.bucket, Key=lg_key)["LastModified"]
    for name in ("trials.parquet", "history.parquet", "stages.parquet"):
        s3.client.delete_object(Bucket=s3.bucket, Key=f"{key}/{name}")
    assert sweep_job.main(argv) == 2  # refused: it needs --resume (or a fresh start)
    # the resume in a subprocess with a time limit: a trial run again would wait for a `nodisk` CPU that
    # the session's Ray lacks (Tune only warns), so a regression fails here instead of hanging the suite
    resume = subprocess.run(
        [sys.executable, str(ROOT / "jobs/sweep.py"), *argv, "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert resume.returncode == 0, (resume.stdout + resume.stderr)[-4000:]
    again = _parquet(s3, f"{key}/trials.parquet")
    assert sorted(again.trial_id) == sorted(trials.trial_id)  # the finished trial, restored, not run again
    body_again = s3.client.get_object(Bucket=s3.bucket, Key=f"{key}/{rj}")["Body"].read().decode()
    assert body_again == body  # nothing reported again: its results are the first run's
    assert s3.client.head_object(Bucket=s3.bucket, Key=lg_key)["LastModified"] == lg_time  # learngene reused
