import subprocess
import sys

import pytest

from mmlg_ray.config import load_config
from mmlg_ray.errors import UserError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_local_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs/local.yaml").model_dump() == load_config(None).model_dump()


def test_paper_preset_loads_and_describes_vitb16():
    cfg = load_config(ROOT / "configs/paper_vitb16.yaml")
    assert cfg.ancestor.source == "open_clip" and cfg.ancestor.arch == "ViT-B-16"
    assert (cfg.ancestor.spec.image_width, cfg.ancestor.spec.text_width) == (768, 512)
    assert cfg.data.retrieval.kind == "flickr30k" and cfg.data.image_classification.kind == "oxford_pets"


def test_every_preset_as_overrides_is_the_same_config():
    """as_overrides (how the suite and benchmarks/sweep_scale.py read configs/tiny.yaml) loses nothing."""
    from mmlg_ray.config import as_overrides, presets

    assert {"tiny", "local", "study_cpu", "paper_vitb16"} <= set(presets())
    for preset in presets():
        sets = as_overrides(preset)
        assert load_config(None, sets).model_dump(mode="json") == load_config(preset).model_dump(mode="json"), preset
        assert load_config(None, sets + ["seed=7"]).seed == 7


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["learngene.schedule=convex", "descendants.grid.depth=[1, 3]", "seed=7"])
    assert cfg.learngene.schedule == "convex"
    assert cfg.descendants.grid.depth == [1, 3]
    assert cfg.seed == 7


@pytest.mark.parametrize(
    "override, field",
    [
        ("descendants.grid.depth=[0]", "descendants.grid.depth"),
        ("ancestor.spec.image_width=100", "ancestor.spec"),
        ("descendants.grid.width=[100]", "descendants.grid.width"),
        ("descendants.grid.method=[magic]", "descendants.grid.method"),
        ("descendants.grid.modality=[audio]", "descendants.grid.modality"),
        ("descendants.pt_budgets=[0.5, 0]", "descendants.pt_budgets"),
        ("descendants.pt_budgets=[]", "descendants.pt_budgets"),
        ("descendants.grid.extraction=[fixed, fixed]", "descendants.grid.extraction"),
        ("descendants.grid.extraction=[sliced]", "descendants.grid.extraction"),
        ("learngene.shared=mlp", "learngene.shared"),
        ("learngene.schedule=cubic", "learngene.schedule"),
        ("data.retrieval.path=/does/not/exist", "data.retrieval.path"),
        ("learngene.extraction.stpes=3", "learngene.extraction.stpes"),
        ("output_dir=ftp://host/run", "output_dir"),
        ("precision=fp8", "precision"),
        ("ray.extraction.offload_params=true", "ray.extraction.offload_params"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(field)
    assert "\n" not in str(e.value)


def test_output_dir_may_be_an_object_store_uri():
    assert load_config(None, ["output_dir=s3://bucket/run"]).output_dir == "s3://bucket/run"


def test_precision_setting_replaces_extraction_bf16():
    cfg = load_config(ROOT / "configs/paper_vitb16.yaml")
    assert cfg.precision == "bf16" and cfg.tf32
    assert load_config(None).precision == "fp32"
    with pytest.raises(UserError) as e:
        load_config(None, ["ray.extraction.bf16=true"])
    assert str(e.value).startswith("ray.extraction.bf16") and "precision" in str(e.value)
    z3 = load_config(None, ["ray.extraction.zero_stage=3", "ray.extraction.offload_params=true"])
    assert z3.ray.extraction.offload_params


def test_precision_enters_cache_keys_only_when_not_fp32():
    fp32, bf16 = load_config(None), load_config(None, ["precision=bf16"])
    keys = ("ancestor.spec", "seed")
    assert fp32.fingerprint(*keys, "precision") == fp32.fingerprint(*keys)  # fp32 caches keep their keys
    assert bf16.fingerprint(*keys, "precision") != fp32.fingerprint(*keys, "precision")


def test_job_exits_2_with_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/sweep.py"),
            "--set",
            "learngene.schedule=cubic",
            "--backend",
            "local",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: learngene.schedule")
    assert not (tmp_path / "out").exists()


def test_missing_config_file():
    with pytest.raises(UserError, match="--config"):
        load_config("nope.yaml")


def test_a_node_local_storage_path_is_refused_on_a_multi_node_cluster():
    """Ray Train / Tune workers write checkpoints to the storage path themselves: on two nodes a local
    folder would split them between disks, unless every node mounts it (ray.storage_shared)."""
    from mmlg_ray.config import load_config
    from mmlg_ray.distributed.settings import storage_problem

    assert storage_problem("/data/run/ray", 1, False) is None
    assert "2 nodes" in storage_problem("/data/run/ray", 2, False)
    assert storage_problem("s3://bucket/run/ray", 8, False) is None
    assert storage_problem("/nfs/run/ray", 8, load_config(None, ["ray.storage_shared=true"]).ray.storage_shared) is None
