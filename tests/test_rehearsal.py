"""The autoscaling rehearsal: the fake cluster made from cluster.yaml, its checks on constructed
timelines, and one tiny rehearsal end to end (jobs/rehearse.py in a subprocess: its own Ray cluster
of fake nodes, started from zero, a spot node preempted mid-sweep, the scale-down)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmlg_ray.engine import rehearsal as R
from mmlg_ray.config import load_config
from mmlg_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_fake_cluster_keeps_cluster_yaml_types_and_resources(cluster):
    plan = R.fake_cluster(cluster, gcs_address="10.0.0.1:6390", max_per_type=2, idle_timeout_s=15)
    c = plan.config
    types = c["available_node_types"]
    workers = {n for n in cluster["available_node_types"] if n != cluster["head_node_type"]}
    assert set(types) == workers | {R.FAKE_HEAD_TYPE}
    # the head keeps cluster.yaml's head resources (no CPU: no training there; the driver resource)
    assert types[R.FAKE_HEAD_TYPE]["resources"] == cluster["available_node_types"]["head"]["resources"]
    for n in workers:
        src = cluster["available_node_types"][n]
        assert types[n]["min_workers"] == src["min_workers"]
        assert types[n]["max_workers"] == min(src["max_workers"], 2)
        # custom resources kept; one g5.2xlarge A10G -> one CPU standing in for it
        assert {k: v for k, v in types[n]["resources"].items() if k != "CPU"} == src["resources"]
        assert types[n]["resources"]["CPU"] == 1
    assert plan.spot_types() == ["gpu_a10g_spot"] and plan.ondemand_types() == ["gpu_a10g"]
    assert c["idle_timeout_minutes"] == pytest.approx(0.25)
    assert c["max_workers"] == 4
    assert c["provider"]["gcs_address"] == "10.0.0.1:6390"
    assert c["provider"]["disable_node_updaters"] and c["provider"]["use_node_id_as_ip"]
    for f in (
        "file_mounts",
        "cluster_synced_files",
        "rsync_exclude",
        "rsync_filter",
        "setup_commands",
        "worker_start_ray_commands",
        "head_start_ray_commands",
    ):
        assert f in c  # without them the autoscaler's monitor dies with a KeyError
    # the provider class the config names exists and is Ray's fake provider
    mod, cls = c["provider"]["module"].rsplit(".", 1)
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    assert issubclass(getattr(__import__(mod, fromlist=[cls]), cls), FakeMultiNodeProvider)
    # a 4-GPU instance type stands in with 4 CPUs (x cpus_per_gpu)
    big = {**cluster, "available_node_types": {**cluster["available_node_types"]}}
    big["available_node_types"]["gpu_a10g"] = {
        **big["available_node_types"]["gpu_a10g"],
        "node_config": {"InstanceType": "g5.12xlarge"},
    }
    assert (
        R.fake_cluster(big, gcs_address="x:1", cpus_per_gpu=2).config["available_node_types"]["gpu_a10g"]["resources"][
            "CPU"
        ]
        == 8
    )


def test_job_overrides_ask_for_cluster_node_types(cluster):
    plan = R.fake_cluster(cluster, gcs_address="x:1")
    cfg = load_config(None, [])
    sets = R.job_overrides(cfg, plan)
    cfg2 = load_config(None, sets)
    assert cfg2.ray.worker_resources == {"ondemand": 0.01}
    assert cfg2.ray.tune.trial_resources == {"spot": 0.01}
    assert cfg2.ray.use_gpu is False and cfg2.ray.tune.trial_gpus == 0 and cfg2.ray.storage_shared
    # a config's own choice is kept
    own = load_config(None, ["ray.tune.trial_resources={ondemand: 0.5}"])
    assert load_config(None, R.job_overrides(own, plan)).ray.tune.trial_resources == {"ondemand": 0.5}
    # more extraction workers than the fake on-demand nodes hold: one line naming the field
    with pytest.raises(UserError, match="ray.num_workers"):
        R.job_overrides(load_config(None, ["ray.num_workers=3"]), plan)
    # work no fake node could hold would wait for the job timeout: refused up front
    with pytest.raises(UserError, match="ray.tune.trial_workers"):
        R.job_overrides(load_config(None, ["ray.tune.trial_workers=2"]), plan)
    with pytest.raises(UserError, match="ray.worker_resources"):
        R.job_overrides(load_config(None, ["ray.worker_resources={gpu_node: 0.01}"]), plan)


def _timeline(counts, events=()):
    samples = [
        {
            "t_s": 2.0 * i,
            "nodes": {"gpu_a10g": a, "gpu_a10g_spot": b},
            "events": [{"text": t, "node_type": nt} for (j, t, nt) in events if j == i],
        }
        for i, (a, b) in enumerate(counts)
    ]
    return R.timeline_frame(samples, ["gpu_a10g", "gpu_a10g_spot"])


def test_timeline_and_checks_on_constructed_runs(cluster):
    plan = R.fake_cluster(cluster, gcs_address="x:1")
    tl = _timeline(
        [(0, 0), (2, 0), (2, 2), (0, 2), (0, 1), (0, 0)],
        events=[(3, "preempted gpu_a10g_spot …00004", "gpu_a10g_spot"), (4, "job succeeded", None)],
    )
    assert list(tl.columns) == ["t_s", "node_type", "nodes", "event"] and len(tl) == 12
    # a node type's event is on its own row, a cluster-wide one on every row of the sample
    assert tl[tl.event.str.startswith("preempted")].node_type.tolist() == ["gpu_a10g_spot"]
    assert len(tl[tl.event == "job succeeded"]) == 2
    good = pd.DataFrame(
        [{"kind": "extraction", "node_type": "gpu_a10g"}, {"kind": "trial", "node_type": "gpu_a10g_spot"}]
    )
    trials = pd.DataFrame(
        {
            "phase": ["search", "search", "seeds"],
            "trial_id": ["a", "b", "c"],
            "status": "finished",
            "preemptions": [1, 0, 0],
            "retries": [0, 0, 1],
        }
    )
    hits = [{"mode": m, "node_type": "gpu_a10g_spot", "node_id": f"n{m}", "processes": 5} for m in ("drain", "kill")]
    kw = dict(
        job_status="SUCCEEDED",
        trials=trials,
        expected_trials=3,
        preemptions=hits,
        preempt_modes=["drain", "kill"],
        scaled_down=True,
    )
    assert all(c.ok for c in R.check_rehearsal(tl, good, plan, **kw))
    assert len(R.check_rehearsal(tl, good, plan, **kw)) == 10

    def failed(**over):
        args = {**kw, **over}
        tl_, pl = args.pop("tl", tl), args.pop("pl", good)
        return {c.name for c in R.check_rehearsal(tl_, pl, plan, **args) if not c.ok}

    # extraction seen on a spot node
    bad = pd.DataFrame(
        [{"kind": "extraction", "node_type": "gpu_a10g_spot"}, {"kind": "trial", "node_type": "gpu_a10g_spot"}]
    )
    assert failed(pl=bad) == {"extraction only on on-demand node types"}
    # a trial recorded twice (a retried trial written again), or one missing
    assert failed(trials=pd.concat([trials, trials.iloc[1:2]])) == {
        "every trial exactly once in trials.parquet, none errored"
    }
    assert failed(expected_trials=4) == {"every trial exactly once in trials.parquet, none errored"}
    # the preempted trial ran out of retries: its row says error
    assert failed(trials=trials.assign(status=["finished", "error", "finished"])) == {
        "every trial exactly once in trials.parquet, none errored"
    }
    # nodes up at the start, or not down at the end
    assert "workers start from zero" in failed(tl=_timeline([(1, 0), (2, 2), (0, 0)]))
    assert "back to zero worker nodes after the idle timeout" in failed(tl=_timeline([(0, 0), (2, 2), (0, 1)]))
    sparse = tl[tl.t_s != 4.0].copy()  # a sample missing: a 4-s gap is fine, a 6-s one is not
    assert "the cluster sampled at least every 5 s" not in failed(tl=sparse)
    assert "the cluster sampled at least every 5 s" in failed(tl=sparse[sparse.t_s != 6.0])
    assert failed(job_status="FAILED", preemptions=[]) == {
        "the job succeeded",
        "a spot node drained on its spot notice, then reclaimed mid-trial",
        "a spot node killed without notice, then reclaimed mid-trial",
    }
    # the drain was not made; the restarts were counted against the wrong cause
    assert failed(preemptions=hits[1:]) == {
        "a spot node drained on its spot notice, then reclaimed mid-trial",
        "trials.parquet counts each restart by its cause",
    }
    assert failed(trials=trials.assign(preemptions=0, retries=[0, 1, 1])) == {
        "trials.parquet counts each restart by its cause"
    }
    # only the kill asked for
    assert not failed(preemptions=hits[1:], preempt_modes=["kill"], trials=trials.assign(preemptions=0))
    png = R.plot_timeline(tl, Path(os.environ.get("TMPDIR", "/tmp")) / f"tl-{os.getpid()}.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    png.unlink()


@pytest.mark.slow  # a Ray cluster of fake nodes, in a subprocess
def test_tiny_rehearsal_end_to_end(tiny_overrides, tmp_path):
    """Fake nodes from zero, extraction on on-demand nodes, trials on spot ones, one preempted mid-trial,
    every trial once, and the scale-down to the head: the command checks them itself (exit 0)."""
    out = tmp_path / "rehearsal"
    # one trial, preempted on its spot node at the first sample (every 2 s) that sees it there: its process
    # start-up alone takes seconds, so the preemption lands mid-trial however fast the machine (a fixed delay
    # raced the trial: on a fast day 400 steps ran in 2.4 s and nothing was preempted); retried on another
    sets = tiny_overrides + [
        "ray.tune.num_samples=1",
        "descendants.seeds=[0]",
        "descendants.finetune.steps=200",
        "descendants.finetune.eval_every=50",
    ]
    cmd = [sys.executable, str(ROOT / "jobs/rehearse.py"), "--output", str(out), "--idle-timeout-s", "10"]
    cmd += ["--preempt-after-s", "0", "--preempt", "drain,kill", "--notice-s", "1"]
    for s in sets:
        cmd += ["--set", s]
    log = tmp_path / "rehearse.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=420)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the rehearsal stops its own cluster on SIGTERM
                proc.wait(60)
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    tl = pd.read_parquet(out / "cluster_timeline.parquet")
    assert list(tl.columns) == ["t_s", "node_type", "nodes", "event"]
    assert set(tl.node_type) == {"gpu_a10g", "gpu_a10g_spot"}
    assert tl.groupby("node_type").t_s.apply(lambda t: t.diff().max()).max() <= 5.0  # a sample every <=5 s
    events = tl.event.dropna()  # (the events of one sample are joined with "; ")
    assert events.str.contains(r"spot notice for gpu_a10g_spot …\w{5}: drained").any()
    assert events.str.contains(r"preempted gpu_a10g_spot …\w{5}: killed 1 s after its notice").any()
    assert events.str.contains(r"preempted gpu_a10g_spot …\w{5}: killed without notice").any()
    summary = json.loads((out / "rehearsal.json").read_text())
    # the trial's first node was drained by the spot watcher, then killed: Tune restarted it without counting a
    # failure; its second node was killed without notice: a failure counted, and the trial retried once more
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials.preemptions.tolist() == [1] and trials.retries.tolist() == [1]
    assert [p["mode"] for p in summary["preemptions"]] == ["drain", "kill"]
    assert summary["trials"] == summary["expected_trials"] == 1
    assert all(c["ok"] for c in summary["checks"]) and len(summary["checks"]) == 10
    # the rehearsal left no process of its cluster behind
    token = f"MMLG_REHEARSAL={summary['token']}"
    token_procs = [p for p in os.listdir("/proc") if p.isdigit() and _has_env(p, token)]
    assert not token_procs, token_procs
    html = (out / "report" / "report.html").read_text()  # the report of a rehearsed sweep shows its timeline
    from mmlg_ray.report.texts import title

    assert title("rehearsal") in html and 'alt="worker nodes per node type' in html


def _has_env(pid: str, kv: str) -> bool:
    try:
        return kv.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
