"""cluster.yaml as Ray's launcher reads it, fit for spot; the job's resource requests that pick its
node types; and no command that stops Ray instances other than its own. No AWS, no Ray cluster."""

import ipaddress
import re
import shlex
from pathlib import Path

import pytest
from types import SimpleNamespace
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "cluster.yaml").read_text()


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(TEXT)


@pytest.fixture(scope="module")
def prepared(cluster):
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(cluster)


def _gpu_types(cluster):
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


def _is_spot(node_type):
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


@pytest.fixture
def no_aws(monkeypatch):
    """Ray's AWS bootstrap steps (what `ray up` runs), with every AWS call refused. boto3 is not one of
    this project's pins; where it is missing, inert stand-ins let Ray's module import."""
    import sys
    import types

    before = set(sys.modules)
    try:
        import boto3  # noqa: F401
    except ImportError:
        stubs = {
            "boto3": {"__version__": "99.0"},
            "boto3.exceptions": {"ResourceNotExistsError": Exception},
            "boto3.resources": {},
            "boto3.resources.base": {"ServiceResource": object},
            "botocore": {},
            "botocore.client": {"BaseClient": object},
            "botocore.config": {"Config": dict},
            "botocore.exceptions": {"ClientError": Exception, "WaiterError": Exception},
        }
        for name, attrs in stubs.items():
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            monkeypatch.setitem(sys.modules, name, mod)
            if "." in name:
                parent, child = name.rsplit(".", 1)
                setattr(sys.modules[parent], child, mod)
    from ray.autoscaler._private.aws import config as aws

    def refuse(*a, **k):
        raise AssertionError("the launcher would call AWS here")

    for name in ("_client", "_resource", "_get_instance_profile", "_get_role"):
        monkeypatch.setattr(aws, name, refuse)
    yield aws
    for name in set(sys.modules) - before:  # nothing imported against the stand-ins outlives the test
        if name.startswith(("ray.autoscaler._private.aws", "boto3", "botocore")):
            del sys.modules[name]


def test_validates_against_rays_cluster_schema(cluster):
    pytest.importorskip("jsonschema")
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    # what `ray up` does before anything reaches AWS: fill provider defaults, then check the schema
    validate_config(prepare_config(cluster))
    broken = dict(cluster, idle_timeout_minutes="soon")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_shape_and_safety(cluster):
    import ray

    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"]["driver"] >= 1  # driver only, no training
    gpu = _gpu_types(cluster)
    assert gpu and all(v["min_workers"] == 0 for v in gpu.values())
    assert any(_is_spot(v) for v in gpu.values()) and not all(_is_spot(v) for v in gpu.values())
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py")
    head_cmd = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd
    for secret in ("aws_access_key", "aws_secret", "secretaccesskey", "password"):
        assert secret not in TEXT.lower()


def test_every_node_has_an_iam_instance_profile(prepared, no_aws):
    types = prepared["available_node_types"]
    profiles = {}
    for name, t in types.items():
        profile = t["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name}: no IamInstanceProfile"
        profiles[name] = profile
    head = prepared["head_node_type"]
    # workers share one profile, not the head's (which may launch instances)
    assert len({str(p) for n, p in profiles.items() if n != head}) == 1
    assert all(p != profiles[head] for n, p in profiles.items() if n != head)
    # the head's own profile is taken as given: the launcher creates no default role (which would
    # lack iam:PassRole for the workers' profile)
    assert no_aws._configure_iam_role(dict(prepared, head_node={}))["available_node_types"] == types


def test_nodes_require_imdsv2_encrypt_their_disks_and_authenticate_with_a_token(cluster):
    for name, t in cluster["available_node_types"].items():
        nc = t["node_config"]
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name  # IMDSv1 refused
        # a hop more than the host: a process in the node's container reaches the metadata service
        assert nc["MetadataOptions"]["HttpPutResponseHopLimit"] >= 2, name
        assert nc["BlockDeviceMappings"] and all(b["Ebs"]["Encrypted"] is True for b in nc["BlockDeviceMappings"]), name
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in cluster["file_mounts"]  # the token every node and the driver present
    # `ray job stop` waits for the driver's graceful stop (Tune's last state save) before SIGKILL
    head = next(c for c in cluster["head_start_ray_commands"] if "ray start" in c)
    assert int(re.search(r"RAY_JOB_STOP_WAIT_TIME_S=(\d+)", head).group(1)) >= 60


def test_iam_policies_are_least_privilege():
    """deploy/iam: the workers may read the data and write the output prefix, nothing else; the head
    also launches workers, terminates only this cluster's instances and passes only the worker role."""
    import json

    iam = ROOT / "deploy/iam"
    head, worker = (json.loads((iam / f"{n}-policy.json").read_text())["Statement"] for n in ("head", "worker"))

    def actions(stmts):
        return {a for s in stmts for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}

    assert all(a.startswith("s3:") for a in actions(worker))
    assert not any("*" in a for a in actions(head) | actions(worker))  # no wildcard actions
    for s in worker:
        res = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        assert all(r.startswith("arn:aws:s3:::YOUR-BUCKET") for r in res)
        if set(actions([s])) & {"s3:PutObject", "s3:DeleteObject"}:
            assert res == ["arn:aws:s3:::YOUR-BUCKET/mmlg_ray/*"]  # writes: the output prefix only
        if "s3:ListBucket" in actions([s]):
            # listing: named prefixes only; a request without a prefix (HeadBucket, which pyarrow and Ray's
            # storage checks send) must pass, or no write reaches the bucket
            assert s["Condition"]["StringLikeIfExists"]["s3:prefix"]
    name = yaml.safe_load(TEXT)["cluster_name"]
    term = next(s for s in head if "ec2:TerminateInstances" in actions([s]))
    assert term["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == name
    # the tag that scopes termination cannot be put on another instance: tags at launch, or on the cluster's own
    for s in (s for s in head if "ec2:CreateTags" in actions([s])):
        cond = s["Condition"]["StringEquals"]
        assert cond.get("ec2:CreateAction") == "RunInstances" or cond.get("ec2:ResourceTag/ray-cluster-name") == name
    passrole = next(s for s in head if "iam:PassRole" in actions([s]))
    assert passrole["Resource"].endswith(":role/mmlg-ray-worker")
    names = {
        t["node_config"]["IamInstanceProfile"]["Name"] for t in yaml.safe_load(TEXT)["available_node_types"].values()
    }
    assert names == {"mmlg-ray-head", "mmlg-ray-worker"}


def test_ssh_only_from_a_cidr_the_user_sets(prepared, no_aws):
    # Ray's launcher adds SSH from the whole world to every security group it creates itself ...
    world = [
        r for r in no_aws._create_default_ssh_inbound_rules() for ip in r["IpRanges"] if ip["CidrIp"] == "0.0.0.0/0"
    ]
    assert world, "Ray no longer opens SSH to the world on its own groups: revisit cluster.yaml's security group"
    # ... so every node type names the user's group, and the launcher creates or changes none
    for name, t in prepared["available_node_types"].items():
        assert t["node_config"].get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"
    assert "security_group" not in prepared["provider"]
    out = no_aws._configure_security_group(prepared)
    assert out["available_node_types"] == prepared["available_node_types"]
    # the documented ingress rules (cluster.yaml's comments, README) name a CIDR that is not the world
    readme = (ROOT / "README.md").read_text()
    cidrs = re.findall(r"(?:--cidr|CidrIp:)\s+(\S+)", TEXT + readme)
    assert cidrs
    for c in cidrs:
        net = ipaddress.ip_network(c, strict=False)
        assert net.prefixlen > 0 and net.num_addresses < 2**24, f"SSH open to {c}"
    settings = yaml.safe_dump(prepared)
    assert "0.0.0.0/0" not in settings and "::/0" not in settings


def _setup_commands(cluster):
    cmds = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        cmds += cluster.get(key) or []
    for t in cluster["available_node_types"].values():
        cmds += t.get("initialization_commands", []) + t.get("worker_setup_commands", [])
    return cmds


def _name(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(path):
    """{normalized name: (version, {sha256 hashes})} of a `uv pip compile --generate-hashes` file."""
    out, current = {}, None
    for line in Path(path).read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", line)
        if m:
            current = _name(m.group(1))
            out[current] = (m.group(2), set())
        elif line.startswith("    --hash=sha256:") and current:
            out[current][1].add(line.split("sha256:")[1].rstrip(" \\"))
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"{path}: unexpected line {line!r}")
    return out


def _requirements_txt():
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert "==" in line, f"requirements.txt pins every package: {line}"
            name, version = line.split("==")
            out[_name(name.split("[")[0])] = version
    return out


def _pyproject():
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


LOCK, CLUSTER_LOCK = ROOT / "requirements.lock", ROOT / "requirements-cluster.lock"
TEST_ONLY = {"pytest", "moto", "ruff"}


def test_the_lock_holds_requirements_txt_with_hashes_and_pyproject_agrees():
    """requirements.lock (`make lock`): every package pinned with its hashes, requirements.txt's pins at
    their versions; pyproject.toml's ranges hold the locked versions; scipy declared, MLflow an extra."""
    from packaging.requirements import Requirement

    lock = _lock(LOCK)
    assert LOCK.read_text().startswith(
        "# This file was autogenerated by uv via the following command:\n#    make lock\n"
    )
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    assert {"torch", "torchvision", "setuptools", "ruff", "pytest"} <= set(lock)  # setuptools: torch needs it
    for name, version in _requirements_txt().items():
        assert lock.get(name, (None,))[0] == version, f"requirements.txt {name}=={version}: run `make lock`"
    project = _pyproject()
    extras = project["optional-dependencies"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for group in extras.values():
        declared += [Requirement(r) for r in group]
    for req in declared:
        if _name(req.name) in lock:
            version = lock[_name(req.name)][0]
            assert req.specifier.contains(version, prereleases=True), f"pyproject {req} excludes the locked {version}"
            # the floor is the locked (tested) version: no range reaching back to releases never tested
            floors = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
            assert floors == [version], f"pyproject {req}: its floor is not the locked {version}"
    names = {_name(Requirement(r).name) for r in project["dependencies"]}
    assert "scipy" in names  # mmlg_ray/report/stats.py imports it
    assert "mlflow-skinny" not in names and any(_name(Requirement(r).name) == "mlflow-skinny" for r in extras["mlflow"])
    assert {_name(Requirement(r).name) for r in extras["dev"]} >= TEST_ONLY


def test_cluster_installs_the_cluster_lock_at_the_tested_versions(cluster):
    """cluster.yaml's setup installs requirements-cluster.lock, hash-checked, and nothing else; that
    lock is pyproject's dependencies + [s3,mlflow] at requirements.lock's versions: the same torch and
    torchvision wheels (their hashes too) as the environment the tests run in."""
    from importlib.metadata import version as installed
    from packaging.requirements import Requirement

    pip_lines = [c for c in _setup_commands(cluster) if "pip" in c]
    assert pip_lines
    mounts = cluster.get("file_mounts") or {}
    for line in pip_lines:
        args = shlex.split(line)
        assert args[:2] == ["pip", "install"] and "--require-hashes" in args, line
        assert not any("==" in a or "://" in a or a in ("-e", ".", "--no-deps") for a in args), line
        lock_path = args[args.index("-r") + 1]
        assert mounts.get(lock_path) == f"./{CLUSTER_LOCK.name}", f"{lock_path} is not file_mounts' {CLUSTER_LOCK.name}"
    tested, nodes = _lock(LOCK), _lock(CLUSTER_LOCK)
    assert all(hashes for _, hashes in nodes.values())
    # the shared packages at the tested versions; botocore alone is s3fs's there, moto's (test-only) here
    differ = {n for n in set(nodes) & set(tested) if nodes[n][0] != tested[n][0]}
    assert differ <= {"botocore"}, {n: (nodes[n][0], tested[n][0]) for n in differ}
    assert set(nodes) - set(tested) <= {"s3fs", "aiobotocore", "aioitertools", "botocore"}
    assert not TEST_ONLY & set(nodes)
    project = _pyproject()
    for r in (
        project["dependencies"] + project["optional-dependencies"]["s3"] + project["optional-dependencies"]["mlflow"]
    ):
        assert _name(Requirement(r).name) in nodes, r
    for pkg in ("torch", "torchvision"):
        assert nodes[pkg] == tested[pkg]  # version and wheel hashes
        assert installed(pkg) == tested[pkg][0], f"this environment's {pkg} is not the lock's: `make setup`"


@pytest.mark.xfail(
    strict=True,
    reason="cluster.yaml's image is CUDA 12.4, the locked torch 2.14.1 a CUDA 13.0 "
    "build: DeepSpeed builds its ops with the image's toolkit and refuses another CUDA major. "
    "Move docker.image to a CUDA 13 Ray image, then drop this marker",
)
def test_image_cuda_matches_the_locked_torch(cluster):
    cuda = re.search(r"-cu(\d+)$", cluster["docker"]["image"]).group(1)
    toolkit = _lock(CLUSTER_LOCK)["cuda-toolkit"][0]  # torch's own CUDA libraries, pinned by its metadata
    assert cuda[:-1] == toolkit.split(".")[0], (cluster["docker"]["image"], f"cuda-toolkit=={toolkit}")


def test_ondemand_and_spot_nodes_are_told_apart_and_the_paper_preset_uses_them(cluster):
    from mmlg_ray.config import load_config

    gpu = _gpu_types(cluster)
    head = cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    ondemand = [v["resources"] for v in gpu.values() if not _is_spot(v)]
    spot = [v["resources"] for v in gpu.values() if _is_spot(v)]
    assert ondemand and spot
    assert all(r.get("ondemand", 0) >= 1 and "spot" not in r for r in ondemand)
    assert all(r.get("spot", 0) >= 1 and "ondemand" not in r for r in spot)
    assert "ondemand" not in head and "spot" not in head

    paper = load_config(ROOT / "configs/paper_vitb16.yaml").ray
    assert paper.worker_resources and paper.tune.trial_resources
    # extraction workers fit on on-demand nodes only; trials on spot nodes only
    for want, fits, never in ((paper.worker_resources, ondemand, spot), (paper.tune.trial_resources, spot, ondemand)):
        for k, amount in want.items():
            assert all(r.get(k, 0) >= amount for r in fits), k
            assert all(k not in r for r in never + [head]), k
    # one GPU per g5.2xlarge: the on-demand types can hold the whole extraction
    assert sum(v["max_workers"] for v in gpu.values() if not _is_spot(v)) >= paper.num_workers


def test_config_resources_reach_rays_requests():
    """ray.worker_resources / ray.tune.trial_resources end up in what Ray is asked for: the
    extraction's ScalingConfig, the trial's placement group, a multi-worker trial's workers and
    the pre-training tasks (Ray's own classes read them; no cluster needed)."""
    import ray
    from ray.train import ScalingConfig
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    from mmlg_ray.config import load_config
    from mmlg_ray.distributed.settings import (
        pretrain_task_options,
        trial_resources,
        trial_worker_resources,
        worker_resources,
    )

    cfg = load_config(
        None,
        [
            "ray.use_gpu=true",
            "ray.cpus_per_worker=4",
            "ray.worker_resources={ondemand: 0.01}",
            "ray.tune.trial_cpus=4",
            "ray.tune.trial_gpus=1",
            "ray.tune.trial_resources={spot: 0.01}",
        ],
    )
    rs, t = cfg.ray, cfg.ray.tune
    sc = ScalingConfig(num_workers=rs.num_workers, use_gpu=rs.use_gpu, resources_per_worker=worker_resources(rs))
    assert sc._resources_per_worker_not_none == {"CPU": 4, "GPU": 1, "ondemand": 0.01}
    bundle = resource_dict_to_pg_factory(trial_resources(t)).bundles[0]
    assert {k: v for k, v in bundle.items() if v} == {"CPU": 4, "GPU": 1, "spot": 0.01}
    remote = ray.remote(**pretrain_task_options(t))(lambda: None)
    assert remote._default_options["resources"] == {"spot": 0.01}
    assert remote._default_options["num_gpus"] == 1
    # a multi-worker trial: a sliver of CPU for the trial itself, the rest for its workers, spot for all
    t.trial_workers = 2
    bundle = resource_dict_to_pg_factory(trial_resources(t)).bundles[0]
    assert {k: v for k, v in bundle.items() if v} == {"CPU": 0.01, "spot": 0.01}
    assert trial_worker_resources(t) == {"CPU": 4, "GPU": 1, "spot": 0.01}
    # the defaults (configs/local.yaml) ask for no custom resource at all
    d = load_config(ROOT / "configs/local.yaml").ray
    assert d.worker_resources == {} and d.tune.trial_resources == {}
    assert set(worker_resources(d)) == {"CPU"} and set(trial_resources(d.tune)) == {"cpu", "gpu"}
    assert pretrain_task_options(d.tune) == {"num_cpus": 1, "num_gpus": 0}


def test_extraction_and_trials_pass_them_to_their_trainers(tmp_path, monkeypatch):
    """The call sites use those builders: extract_on_ray's and a multi-worker trial's TorchTrainer."""
    import ray
    import ray.train.torch
    from ray import tune
    from ray.train.v2.api.callback import UserCallback
    from ray.tune.integration import ray_train

    from mmlg_ray.config import load_config
    from mmlg_ray.distributed import extract, settings, trial

    seen = []

    class Stop(Exception):
        pass

    def fake_trainer(*a, scaling_config, **k):
        seen.append(scaling_config._resources_per_worker_not_none)
        raise Stop

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", fake_trainer)
    monkeypatch.setattr(ray, "put", lambda x: x)
    monkeypatch.setattr(settings, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(settings, "check_storage", lambda cfg, storage: None)  # it asks the (absent) cluster
    monkeypatch.setattr(tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t0"})())
    monkeypatch.setattr(ray_train, "TuneReportCallback", type("NoTune", (UserCallback,), {}))  # needs a Tune session
    cfg = load_config(
        None,
        ["ray.worker_resources={ondemand: 0.01}", "ray.tune.trial_resources={spot: 0.5}", "ray.tune.trial_workers=2"],
    )
    with pytest.raises(Stop):
        extract.extract_on_ray(cfg, SimpleNamespace(spec=cfg.ancestor.spec), tmp_path / "lg.safetensors")
    with pytest.raises(Stop):
        trial.trial_fn({"cell": "x"}, ctx={"cfg": cfg.model_dump(mode="json"), "storage": str(tmp_path)})
    assert seen == [{"CPU": 1, "ondemand": 0.01}, {"CPU": 1, "spot": 0.5}]


RAY_STOP = re.compile(r"\bray\s+stop\b")


def test_no_command_stops_other_ray_instances(cluster):
    """`ray stop` (2.58 has no way to scope it) stops every Ray instance of the machine. It may run
    only as cluster.yaml's restart step inside a node's own container, never in a script, the
    Makefile, CI, code, or a command the README tells people to run."""
    files = [p for p in (ROOT / "scripts").rglob("*") if p.is_file()]
    files += [
        ROOT / "Makefile",
        *(ROOT / ".ci").rglob("*"),
        *(ROOT / "jobs").rglob("*.py"),
        *(ROOT / "mmlg_ray").rglob("*.py"),
        *(ROOT / "benchmarks").rglob("*.py"),
    ]
    for p in files:
        if p.is_file():
            for n, line in enumerate(p.read_text(errors="ignore").splitlines(), 1):
                assert not RAY_STOP.search(line.split("#")[0]), f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
    readme_code, inside = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            readme_code.append(line.split("#")[0])
    assert readme_code and not RAY_STOP.search("\n".join(readme_code))
    # cluster.yaml: only the start commands, which run in the node's own container
    assert cluster["docker"]["container_name"]
    allowed = ("head_start_ray_commands", "worker_start_ray_commands")
    for key, value in cluster.items():
        if key not in allowed:
            assert not RAY_STOP.search(yaml.safe_dump(value)), key
    for key in allowed:
        assert [c for c in cluster[key] if RAY_STOP.search(c)] == ["ray stop"]  # plain, first, before `ray start`
        assert RAY_STOP.search(cluster[key][0])


def test_local_job_script_stops_only_the_cluster_it_started():
    text = (ROOT / "scripts/run_local_job.sh").read_text()
    code = "\n".join(ln.split("#")[0] for ln in text.splitlines())
    assert "ray start --head --block" in code and "--temp-dir=" in code
    assert re.search(r'kill -TERM "\$head_pid"', code)  # the one `ray start --block` process it started
    assert "pkill" not in code and "killall" not in code
