"""Two Ray nodes on this machine that share no disk (tests/two_node_sweep.py, in a subprocess; the second
node in a mount namespace of its own, a private tmpfs over /tmp and the cache folder): the ZeRO
extraction's two workers land on different nodes, the trial runs on the second node, and the main job's
outputs all reach the S3 server; nothing is read from another node's disk (the learngene is
consolidated by the driver from the checkpoint in S3, the trial reads its inputs by reference)."""

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

pytestmark = pytest.mark.slow  # a Ray cluster of its own, in a subprocess
ROOT = Path(__file__).resolve().parents[1]


def _private_mounts() -> bool:
    """A mount namespace with a tmpfs of its own can be made here (root, or a kernel that lets users)."""
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /tmp"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _private_mounts(), reason="needs `unshare --mount` and tmpfs mounts (root)")
def test_two_node_cluster_extracts_on_both_nodes_and_sweeps_to_s3(tiny_overrides, s3, tmp_path):
    key = f"two-nodes/{uuid.uuid4().hex[:8]}"
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
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/two_node_sweep.py"), f"s3://{s3.bucket}/{key}", json.dumps(sets)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
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
    # 2 workers of 1 CPU on two 1-CPU nodes: one on each, as Ray's state API reports
    assert sorted(res["train_worker_nodes"]) == res["nodes"]
    assert res["trial_nodes"] == [res["nodisk"]] and res["nodisk_sees_the_heads_tmp"] is False
    files = {k[len(key) + 1 :] for k in s3.keys(key + "/")}
    assert {"trials.parquet", "stages.parquet", "report/report.html", "config.yaml"} <= files
    assert [f for f in files if f.startswith("learngenes/mmlg-")]
    # both ranks' ZeRO shards in the one checkpoint in S3 (each rank wrote only its own shard)
    ckpt = [f for f in files if f.startswith("ray/extract-mmlg-") and "/checkpoint_" in f]
    for rank in (0, 1):  # DeepSpeed's per-rank optimizer shard, e.g. latest_zero/zero_pp_rank_1_mp_rank_00_...
        assert any(f"/zero_pp_rank_{rank}_" in f for f in ckpt), ckpt
    body = s3.client.get_object(Bucket=s3.bucket, Key=f"{key}/trials.parquet")["Body"].read()
    trials = pd.read_parquet(io.BytesIO(body))
    assert len(trials) == 1 and trials.final_score.notna().all()
    stages = pd.read_parquet(
        io.BytesIO(s3.client.get_object(Bucket=s3.bucket, Key=f"{key}/stages.parquet")["Body"].read())
    )
    assert stages.set_index("stage").loc["extraction", "device_s"] > 0
