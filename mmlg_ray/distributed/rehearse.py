"""The autoscaling rehearsal: cluster.yaml's node types on one machine (Ray's fake_multinode provider),
the main job submitted to it as cluster users submit it, spot nodes preempted mid-trial (drained on a
notice by the spot watcher, or killed without one), and the cluster watched until it is back to its
head alone.

    python jobs/rehearse.py --config configs/local.yaml --output runs/rehearsal

Only the cluster started here is stopped: every process of it (head, autoscaler, the fake worker
nodes the autoscaler starts) carries MMLG_REHEARSAL=<token> in its environment, and exactly those
processes are signalled, never another Ray instance on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import yaml

from mmlg_ray.engine import rehearsal as R
from mmlg_ray.atomic import atomic_path, write_json
from mmlg_ray.config import Config
from mmlg_ray.errors import UserError

log = logging.getLogger("mmlg_ray")
ROOT = Path(__file__).resolve().parents[2]


def expected_trials(cfg: Config) -> int:
    """Tune trials the sweep runs: num_samples per grid cell in the search phase, one per cell and
    further seed in the seeds phase."""
    from mmlg_ray.engine.pipeline import cells

    n = len(cells(cfg))
    return n * cfg.ray.tune.num_samples + n * (len(cfg.descendants.seeds) - 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_pids(token: str, node_id: str | None = None) -> list[int]:
    """Processes whose environment carries this rehearsal's token (and, given node_id, that fake node's id)."""
    want = f"MMLG_REHEARSAL={token}".encode()
    node = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() if node_id else None
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env and (node is None or node in env):
            pids.append(int(p))
    return pids


def _kill(pids: list[int], sig=signal.SIGKILL) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class Rehearsal:
    def __init__(
        self,
        cfg: Config,
        config_arg: str | None,
        sets: list[str],
        out: Path,
        cluster_yaml: Path,
        *,
        cpus_per_gpu: int = 1,
        max_per_type: int = 2,
        idle_timeout_s: float = 20.0,
        sample_s: float = 2.0,
        preempt_after_s: float = 5.0,
        preempt: tuple[str, ...] = ("drain", "kill"),
        notice_s: float = 5.0,
        scale_down_wait_s: float = 240.0,
        job_timeout_s: float = 3600.0,
    ):
        self.cfg, self.config_arg, self.sets, self.out = cfg, config_arg, list(sets), Path(out)
        self.cpus_per_gpu, self.sample_s, self.preempt_after_s = cpus_per_gpu, sample_s, preempt_after_s
        # the preemptions to make, in order, each of a trial on a spot node: "drain" (the spot watcher drains
        # the node on its interruption notice, served by a fake metadata service; the node is killed
        # notice_s later) or "kill" (killed without notice)
        self.preempt_modes, self.notice_s = list(preempt), notice_s
        # the autoscaler's idle timeout, its 5-s update period, and the GCS noticing a node's exit
        self.scale_down_wait_s = max(scale_down_wait_s, 3 * idle_timeout_s + 60)
        self.job_timeout_s = job_timeout_s
        try:
            cluster = yaml.safe_load(Path(cluster_yaml).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(
                "--cluster",
                f"cannot be read ({e.__class__.__name__}: {e})",
                "give the path of a Ray cluster launcher YAML such as cluster.yaml",
            ) from None
        self.token = uuid.uuid4().hex[:12]
        self.port, self.dash = _free_port(), _free_port()
        from ray._private.services import get_node_ip_address

        self.ip = get_node_ip_address()
        self.plan = R.fake_cluster(
            cluster,
            gcs_address=f"{self.ip}:{self.port}",
            cpus_per_gpu=cpus_per_gpu,
            max_per_type=max_per_type,
            idle_timeout_s=idle_timeout_s,
        )
        self.job_sets = R.job_overrides(cfg, self.plan, cpus_per_gpu)
        self.samples: list[dict] = []
        self.placements: list[dict] = []
        self.events: list[dict] = []
        self.preemptions: list[dict] = []  # each preemption made: mode, node type and id, processes killed
        self._preempting = False  # a drained node waiting for its reclaim
        self._hit: set[str] = set()  # trial actors chosen for a preemption
        self._drains: list[threading.Thread] = []  # drain-then-reclaim threads, joined before the checks
        self.t0 = time.time()
        self.head: subprocess.Popen | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="mmlg_rh."))  # short: Ray's socket paths live under it
        self._trial_seen: dict[str, float] = {}
        self._trials_started = False
        self.killed: set[str] = set()  # node ids this rehearsal preempted
        self.classes: set[str] = set()  # every actor class seen (rehearsal.json)

    # -- the cluster -----------------------------------------------------------------------------
    def _env(self) -> dict:
        bindir = str(Path(sys.executable).parent)  # the autoscaler runs `ray` from the head's PATH
        return {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "RAY_FAKE_CLUSTER": "1",
            "MMLG_REHEARSAL": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "PYTHONUNBUFFERED": "1",
            # the autoscaler imports the provider (mmlg_ray.distributed.fake_provider) from here
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }

    def start_head(self) -> None:
        cfg_path = self.tmp / "cluster.yaml"
        cfg_path.write_text(yaml.safe_dump(self.plan.config, sort_keys=False))
        head_res = self.plan.config["available_node_types"][R.FAKE_HEAD_TYPE]["resources"]
        custom = {k: v for k, v in head_res.items() if k not in ("CPU", "GPU")}
        ray_bin = str(Path(sys.executable).parent / "ray")
        cmd = [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--temp-dir={self.tmp}",
            f"--port={self.port}",
            f"--node-ip-address={self.ip}",
            f"--num-cpus={int(head_res.get('CPU', 0))}",
            f"--num-gpus={int(head_res.get('GPU', 0))}",
            f"--resources={json.dumps(custom)}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dash}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--autoscaling-config={cfg_path}",
            "--disable-usage-stats",
        ]
        log.info(
            "rehearsal: starting the head (GCS port %d, dashboard 127.0.0.1:%d, files in %s)",
            self.port,
            self.dash,
            self.tmp,
        )
        self.head_log = open(self.tmp / "head.log", "w")
        self.head = subprocess.Popen(
            cmd, stdout=self.head_log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True
        )
        self.t0 = time.time()
        import urllib.request

        deadline = time.time() + 180
        while time.time() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"the rehearsal's Ray head exited: {(self.tmp / 'head.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.dash}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError("the rehearsal's Ray dashboard did not answer within 180 s")

    def stop(self) -> None:
        """Stop this rehearsal's cluster, and nothing else."""
        if self.head is not None and self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                self.head.wait(30)
            except subprocess.TimeoutExpired:
                pass
        _kill(_our_pids(self.token), signal.SIGTERM)  # fake worker nodes the autoscaler started
        time.sleep(2)
        _kill(_our_pids(self.token))
        if self.head is not None:
            try:
                self.head.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.head = None

    # -- watching ------------------------------------------------------------------------------
    def event(self, text: str, node_type: str | None = None) -> None:
        t = time.time() - self.t0
        self.events.append({"t_s": t, "text": text, "node_type": node_type})
        log.info("rehearsal: %6.1f s  %s", t, text)

    def sample(self) -> None:
        from ray.util.state import list_actors, list_nodes

        addr = f"http://127.0.0.1:{self.dash}"
        nodes = list_nodes(
            address=addr, filters=[("state", "=", "ALIVE")], limit=1000, timeout=10, raise_on_missing_output=False
        )
        types = {}
        counts = {nt: 0 for nt in self.plan.types}
        for n in nodes:
            nt = self.plan.type_of(n.resources_total or {})
            types[n.node_id] = nt
            # a node killed here is gone, though the GCS lists it alive until its health checks fail
            if nt is not None and n.node_id not in self.killed:
                counts[nt] += 1
        t = time.time() - self.t0
        actors = list_actors(
            address=addr, filters=[("state", "=", "ALIVE")], limit=10000, timeout=10, raise_on_missing_output=False
        )
        # a trial seen in this sample makes every Train worker of it a trial's (single-worker trials: none)
        if any(a.class_name.endswith("ImplicitFunc") for a in actors):
            self._trials_started = True
        for a in actors:
            self.classes.add(a.class_name)
            if a.node_id not in types:  # a node that joined between the two calls: the next sample has it
                continue
            kind = (
                "extraction"
                if a.class_name == "RayTrainWorker" and not self._trials_started
                else "trial"
                if a.class_name.endswith("ImplicitFunc")
                else None
            )  # Tune's function trainable
            if kind is None:
                continue
            if kind == "trial":
                self._trials_started = True
            nt = types[a.node_id]
            self.placements.append(
                {
                    "t_s": t,
                    "kind": kind,
                    "class_name": a.class_name,
                    "actor_id": a.actor_id,
                    "node_id": a.node_id,
                    "node_type": nt or "head",
                }
            )
            if kind == "trial" and nt in self.plan.spot_types():
                self._trial_seen.setdefault(a.actor_id, t)
                if (
                    self._may_preempt(a.actor_id, a.node_id)
                    and t - self._trial_seen[a.actor_id] >= self.preempt_after_s
                ):
                    self._hit.add(a.actor_id)
                    if self.preempt_modes[len(self._hit) - 1] == "kill":
                        self.preempt(a.node_id, nt, "kill")
                    else:
                        self._preempting = True
                        self._drains.append(
                            threading.Thread(target=self.drain_then_reclaim, args=(a.node_id, nt), daemon=True)
                        )
                        self._drains[-1].start()
        evs = [e for e in self.events if e.get("_sampled") is None]
        for e in evs:
            e["_sampled"] = True
        self.samples.append({"t_s": t, "nodes": counts, "events": evs})

    def _may_preempt(self, actor_id: str, node_id: str) -> bool:
        """A preemption is left to make, none is under way, and this trial actor and its node were not hit."""
        return (
            len(self._hit) < len(self.preempt_modes)
            and not self._preempting
            and actor_id not in self._hit
            and node_id not in self.killed
        )

    def preempt(self, node_id: str, node_type: str, mode: str = "kill") -> None:
        """Kill every process of one fake node at once, as a spot reclaim does (mode "kill": no notice
        before; "drain": after the node was drained on its notice)."""
        pids = _our_pids(self.token, node_id)
        if not pids:  # its processes are not visible here (/proc unreadable?): nothing was preempted
            log.warning("rehearsal: no process of node %s found to kill", node_id)
            return
        _kill(pids)
        self.killed.add(node_id)
        how = "killed without notice" if mode == "kill" else f"killed {self.notice_s:g} s after its notice"
        self.preemptions.append({"mode": mode, "node_type": node_type, "node_id": node_id, "processes": len(pids)})
        self.event(f"preempted {node_type} …{node_id[-5:]}: {how}", node_type)

    def drain_then_reclaim(self, node_id: str, node_type: str) -> None:
        """The drain path of cluster.yaml's spot nodes: a metadata service on loopback serves the node's
        interruption notice, the spot watcher (mmlg_ray.distributed.spot_watch, as on the node) reads it
        and drains the node with the preemption reason; notice_s later the node is killed."""
        from mmlg_ray.distributed import spot_watch as W
        from mmlg_ray.distributed.fake_imds import FakeImds, notice_in

        imds = FakeImds("spot", notice=notice_in(120))
        try:
            ray_cli = str(Path(sys.executable).with_name("ray"))
            notice = W.watch(
                W.Imds(imds.url), f"{self.ip}:{self.port}", node_id=node_id, poll_s=0.2, ray_cli=ray_cli, max_polls=25
            )
            if notice is None or not notice.drained:  # no notice read, or `ray drain-node` refused: no drain made
                self.event(f"spot notice for {node_type} …{node_id[-5:]}: not drained (see the log)", node_type)
                return
            self.event(f"spot notice for {node_type} …{node_id[-5:]}: drained", node_type)
            time.sleep(self.notice_s)  # AWS's two minutes, shortened
            self.preempt(node_id, node_type, "drain")
        except Exception as e:  # noqa: BLE001 (the rehearsal goes on; its checks say what did not happen)
            log.warning("rehearsal: draining node %s failed: %s", node_id, e)
        finally:
            imds.close()
            self._preempting = False

    # -- the job -------------------------------------------------------------------------------
    def job_command(self) -> list[str]:
        runtime_env = {
            "excludes": ["runs/", ".venv/", ".git/", "**/__pycache__/"],
            "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"},
        }
        sweep = ["python", "jobs/sweep.py", "--output", str(self.out.resolve())]
        if self.config_arg:
            sweep += ["--config", self.config_arg]
        for s in self.sets + self.job_sets:
            sweep += ["--set", s]
        return [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{self.dash}",
            "--working-dir",
            ".",
            "--entrypoint-resources",
            '{"driver": 1}',
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *sweep,
        ]

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        status = "NOT SUBMITTED"
        scaled_down = False
        stop_watch = threading.Event()
        errors: list[str] = []

        def watch():
            while not stop_watch.is_set():
                try:
                    self.sample()
                except Exception as e:  # a State API call that timed out: the next sample tries again
                    errors.append(repr(e))
                stop_watch.wait(self.sample_s)

        try:
            self.start_head()
            self.event("head up")
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            cmd = self.job_command()
            log.info("rehearsal: %s", " ".join(cmd))
            self.event("job submitted")
            env = {k: v for k, v in self._env().items() if k not in ("RAY_FAKE_CLUSTER", "MMLG_REHEARSAL")}
            try:
                job = subprocess.run(cmd, cwd=ROOT, env=env, timeout=self.job_timeout_s)
                status = "SUCCEEDED" if job.returncode == 0 else "FAILED"
            except subprocess.TimeoutExpired:
                status = "TIMED OUT"
            status = self._job_status() or status
            self.event(f"job {status.lower()}")
            deadline = time.time() + self.scale_down_wait_s
            while time.time() < deadline:
                time.sleep(self.sample_s)
                if self.samples and sum(self.samples[-1]["nodes"].values()) == 0:
                    scaled_down = True
                    self.event("scaled down to the head")
                    time.sleep(self.sample_s * 1.5)  # one sample more, with the event on it
                    break
            stop_watch.set()
            watcher.join(30)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the timeline so far is still written
            status = "INTERRUPTED"
            self.event("rehearsal interrupted")
        finally:
            stop_watch.set()
            # a second Ctrl-C / SIGTERM must not cut the cleanup short and leave fake nodes running
            saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                self.stop()
            finally:
                for sig, h in saved.items():
                    signal.signal(sig, h)
        wall = time.time() - self.t0
        rc = self.finish(status, scaled_down, wall, errors)
        return 130 if status == "INTERRUPTED" else rc

    def _job_status(self) -> str | None:
        try:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(f"http://127.0.0.1:{self.dash}")
            jobs = client.list_jobs()
            return str(jobs[-1].status.value) if jobs else None
        except Exception:
            return None

    def finish(self, status: str, scaled_down: bool, wall: float, errors: list[str]) -> int:
        for t in self._drains:
            t.join(self.notice_s + 60)
        types = list(self.plan.types)
        tl = R.timeline_frame(self.samples, types)
        with atomic_path(self.out / "cluster_timeline.parquet") as tmp:
            tl.to_parquet(tmp, index=False)
        placements = pd.DataFrame(
            self.placements, columns=["t_s", "kind", "class_name", "actor_id", "node_id", "node_type"]
        )
        trials_path = self.out / "trials.parquet"
        trials = pd.read_parquet(trials_path) if trials_path.exists() else None
        checks = R.check_rehearsal(
            tl,
            placements.drop_duplicates(["actor_id", "node_id"]),
            self.plan,
            job_status=status,
            trials=trials,
            expected_trials=expected_trials(self.cfg),
            preemptions=self.preemptions,
            preempt_modes=self.preempt_modes,
            scaled_down=scaled_down,
        )
        R.plot_timeline(tl, self.out / "cluster_timeline.png")
        summary = {
            "token": self.token,
            "wall_s": round(wall, 1),
            "job_status": status,
            "trials": None if trials is None else len(trials),
            "expected_trials": expected_trials(self.cfg),
            "preemptions": self.preemptions,
            "idle_timeout_s": self.plan.config["idle_timeout_minutes"] * 60,
            "samples": len(self.samples),
            "sample_errors": errors[:5],
            "actor_classes": sorted(self.classes),
            "job_overrides": self.job_sets,
            "events": [{"t_s": round(e["t_s"], 1), "event": e["text"]} for e in self.events],
            "checks": [{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
            "cluster_config": self.plan.config,
        }
        write_json(self.out / "rehearsal.json", summary)
        if trials is not None:  # the report of a rehearsed sweep gets the timeline's plot
            try:
                from mmlg_ray.report import build_output_report

                build_output_report(str(self.out))
            except Exception as e:  # the checks stand without the report
                log.warning("rehearsal: the report was not rebuilt: %s", e)
        print(
            f"\nrehearsal: {wall:.0f} s wall, job {status}, {summary['trials']} trials "
            f"(planned {summary['expected_trials']})"
        )
        for e in summary["events"]:
            print(f"  {e['t_s']:7.1f} s  {e['event']}")
        for c in checks:
            print(f"  [{'ok' if c.ok else 'FAILED'}] {c.name}: {c.detail}")
        print(f"timeline: {self.out / 'cluster_timeline.parquet'}")
        if all(c.ok for c in checks):
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
            return 0
        print(f"Ray's logs are kept in {self.tmp}", file=sys.stderr)
        return 1


def rehearse(cfg: Config, config_arg: str | None, sets: list[str], out, cluster_yaml, **kw) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mmlg_ray").setLevel(logging.INFO)
    r = Rehearsal(cfg, config_arg, sets, Path(out), Path(cluster_yaml), **kw)

    def _term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        return r.run()
    finally:
        signal.signal(signal.SIGTERM, old)
