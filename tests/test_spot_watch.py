"""The spot-notice watcher (mmlg_ray.distributed.spot_watch) against an instance metadata service on
loopback that speaks IMDSv2 (a session token on every read, 404 until the notice): it exits on an
on-demand instance, drains on the notice with the preemption reason and the deadline, and, on a real
Ray cluster (a head and two workers), an actor lost with the drained node fails as *preempted*: the flag by which Tune
retries a trial without counting a failure and Ray Train charges max_preemption_failures instead of
max_failures."""

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmlg_ray.distributed import spot_watch as W
from mmlg_ray.distributed.fake_imds import FakeImds, notice_in

ROOT = Path(__file__).resolve().parents[1]


def test_notice_parsing_and_the_drain_command():
    n = W.parse_notice('{"action": "terminate", "time": "2026-12-07T10:02:00Z"}', now=1796637600.0)  # 10:00:00
    assert n == W.Notice("terminate", "2026-12-07T10:02:00Z", 120)
    late = W.parse_notice('{"action": "stop", "time": "2026-12-07T10:02:00Z"}', now=1796637800.0)
    assert late.deadline_s == 1  # past its time: drain at once
    cmd = W.drain_command(n, "10.0.0.1:6379", "ab" * 28, ray_cli="/venv/bin/ray")
    assert cmd[:2] == ["/venv/bin/ray", "drain-node"]
    assert "--reason=DRAIN_NODE_REASON_PREEMPTION" in cmd and "--deadline-remaining-seconds=120" in cmd
    assert "--address=10.0.0.1:6379" in cmd and f"--node-id={'ab' * 28}" in cmd
    assert any(
        c.startswith("--reason-message=spot interruption notice: terminate at 2026-12-07T10:02:00Z") for c in cmd
    )


def test_watcher_exits_on_demand_and_polls_with_a_fresh_token_on_spot():
    on_demand = FakeImds("on-demand")
    assert W.watch(W.Imds(on_demand.url), "x:1", node_id="n", poll_s=0) is None
    assert on_demand.reads == ["/latest/meta-data/instance-life-cycle"]
    spot = FakeImds("spot")
    imds = W.Imds(spot.url)
    assert W.watch(imds, "x:1", node_id="n", poll_s=0, max_polls=3) is None  # no notice: polls on
    assert spot.reads.count("/latest/meta-data/spot/instance-action") == 3
    spot.tokens += 1  # the service rotated its token: the watcher's is refused once, then renewed
    assert imds.get("/latest/meta-data/instance-life-cycle") == "spot"


def test_an_odd_notice_is_polled_again_and_a_failing_drain_is_retried_with_rays_message(tmp_path, caplog, monkeypatch):
    imds = FakeImds("spot")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30))
    imds.notice = ["not json", {"action": "terminate", "time": when}]  # a bad document first, then the notice
    # a `ray` that refuses twice (its message on stderr), then drains
    calls = tmp_path / "calls"
    ray = tmp_path / "ray"
    ray.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'[ $(wc -l < {calls}) -ge 3 ] && exit 0\necho "GCS unavailable" >&2; exit 1\n'
    )
    ray.chmod(0o755)
    # the watcher's own waits (2 s between drain attempts) shortened, in its module only
    monkeypatch.setattr(W, "time", SimpleNamespace(time=time.time, sleep=lambda s: time.sleep(min(s, 0.05))))
    with caplog.at_level("WARNING", logger="mmlg_ray.spot_watch"):
        notice = W.watch(W.Imds(imds.url), "x:1", node_id="n1", poll_s=0, ray_cli=str(ray), max_polls=5)
    assert notice is not None and notice.action == "terminate" and notice.drained
    assert len(calls.read_text().splitlines()) == 3  # two refusals, then the drain
    assert "no notice read" in caplog.text and caplog.text.count("GCS unavailable") == 2
    assert "node n1 drained" in caplog.text


@pytest.mark.slow  # a two-node Ray cluster of its own, in a subprocess
def test_a_drained_spot_node_loses_its_actor_and_task_as_preempted(tmp_path):
    imds = FakeImds("spot", notice=notice_in(120))
    script = ROOT / "tests" / "spot_drain.py"
    proc = subprocess.run(
        [sys.executable, str(script), imds.url], capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT ") :])
    assert res["notice"]["action"] == "terminate" and 0 < res["notice"]["deadline_s"] <= 120
    assert res["notice"]["drained"] is True  # `ray drain-node` accepted the drain
    assert res["actor_error"] == "ActorDiedError" and res["preempted"] is True
    assert res["control_preempted"] is False  # the same loss without the notice: a plain node death
    # the pre-training watch: the task on the drained node ran again without spending ray.max_failures (1), the
    # one on the node lost without notice spent it; both finished on the replacement nodes
    assert res["tasks"] == {
        "on_spot": {"preemptions": 1, "retries": 0},
        "on_control": {"preemptions": 0, "retries": 1},
    }
    assert res["moved"] and res["failed"] == [] and res["losses"] == {"on_spot": 1, "on_control": 1}


def test_cluster_yaml_starts_the_watcher_on_every_worker():
    import yaml

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert cluster["file_mounts"]["~/spot_watch.py"] == "./mmlg_ray/distributed/spot_watch.py"
    (start,) = [c for c in cluster["worker_start_ray_commands"] if "spot_watch.py" in c]
    assert "--address=$RAY_HEAD_IP:6379" in start and "RAY_AUTH_MODE=token" in start
    assert "nohup python ~/spot_watch.py" in start and "& echo $! > /tmp/spot_watch.pid" in start  # in the background
    assert start.startswith("kill $(cat /tmp/spot_watch.pid")  # an earlier start's watcher stopped first
    assert not [c for c in cluster["head_start_ray_commands"] if "spot_watch" in c]
    # the mounted file runs without the project (not installed on the nodes): stdlib and ray only
    import ast

    tree = ast.parse((ROOT / "mmlg_ray/distributed/spot_watch.py").read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= set(sys.stdlib_module_names) | {"ray", "__future__"}, mods
