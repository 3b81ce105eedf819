from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


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
    gpu = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    assert gpu and all(v["min_workers"] == 0 for v in gpu.values())
    assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for v in gpu.values())
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py")
    head_cmd = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd
    ports = [p["FromPort"] for p in cluster["provider"]["security_group"]["IpPermissions"]]
    assert ports == [22]
    text = (ROOT / "cluster.yaml").read_text().lower()
    for secret in ("aws_access_key", "aws_secret", "secretaccesskey", "password"):
        assert secret not in text
