"""Stage artifacts by reference (mmlg_ray.engine.artifacts, mmlg_ray.engine.job.trial_inputs): a URI plus a content
hash, read through a node-local cache keyed by the hash; a trial reads only what its cell needs."""

import hashlib
import uuid

import pytest
import torch

from mmlg_ray.engine import artifacts as art
from mmlg_ray import storage as stor
from mmlg_ray.engine.arms import Cell


def test_a_uri_artifact_is_downloaded_once_per_node_and_checked_against_its_hash(s3, tmp_path):
    uri = f"s3://{s3.bucket}/art/{uuid.uuid4().hex[:8]}/w.safetensors"
    with stor.writing(uri) as tmp:
        tmp.write_bytes(b"weights" * 1000)
    ref = art.ref_to(uri)
    assert ref.sha256 == hashlib.sha256(b"weights" * 1000).hexdigest()
    cache = tmp_path / "cache"
    p = art.local_path(ref, cache)
    assert p == cache / "artifacts" / f"{ref.sha256}.safetensors" and p.read_bytes() == b"weights" * 1000
    s3.client.delete_object(Bucket=s3.bucket, Key=uri.split(f"{s3.bucket}/", 1)[1])
    assert art.local_path(ref, cache) == p  # the node's copy: no second download (the object is gone)
    # the object replaced by other bytes: refused, never read as the artifact the reference names
    with stor.writing(uri) as tmp:
        tmp.write_bytes(b"other")
    with pytest.raises(RuntimeError, match="changed since it was written"):
        art.local_path(ref, tmp_path / "other-node")
    assert not list((tmp_path / "other-node").rglob("*.safetensors"))  # nothing half-written left
    local = tmp_path / "x.bin"
    local.write_bytes(b"x")
    assert art.local_path(art.ref_to(str(local)), cache) == local  # a local path is read in place


def test_a_trial_reads_only_what_its_cell_needs(tiny_ancestor, tiny_learngene_path, tmp_path):
    from safetensors.torch import save_file

    from mmlg_ray.engine.job import trial_context, trial_inputs

    anc_file = tmp_path / "ancestor.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_ancestor.state.items()}, str(anc_file))
    anc_ref = art.ref_to(str(anc_file))
    lg_ref = art.ref_to(str(tiny_learngene_path))
    from mmlg_ray.config import load_config

    cfg = load_config(None, [f"cache_dir={tmp_path / 'cache'}"])
    ctx = trial_context(cfg, tiny_ancestor, anc_ref, {"mmlg": lg_ref}, [], None)
    assert len(repr(ctx)) < 20_000  # references only, whatever the artifacts' size

    anc, lgs, pre = trial_inputs(ctx, Cell("image", 2, 64, "scratch"))
    assert anc.state == {} and lgs == {} and pre == {} and anc.spec == tiny_ancestor.spec
    anc, lgs, pre = trial_inputs(ctx, Cell("image", 2, 64, "mmlg", "fixed"))
    assert anc.state == {} and list(lgs) == ["mmlg"] and pre == {}
    assert trial_inputs(ctx, Cell("text", 1, 64, "mmlg", "fixed"))[1]["mmlg"] is lgs["mmlg"]  # loaded once
    anc, lgs, pre = trial_inputs(ctx, Cell("image", 2, 64, "weight_selection"))
    assert lgs == {} and set(anc.state) == set(tiny_ancestor.state)
    assert all(torch.equal(anc.state[k], v) for k, v in tiny_ancestor.state.items())


def test_a_pt_ft_trial_whose_shape_is_not_written_says_so(tiny_cfg, tiny_ancestor, tmp_path):
    from mmlg_ray.engine.job import pretrain_jobs, trial_context, trial_inputs
    from mmlg_ray.storage import OutputDir

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.descendants.grid.method = ["pt_ft"]
    jobs = pretrain_jobs(cfg, tiny_ancestor.spec, OutputDir(tmp_path / "out"))
    ctx = trial_context(cfg, tiny_ancestor, None, {}, jobs, None)
    with pytest.raises(RuntimeError, match="not written.*--resume"):
        trial_inputs(ctx, Cell("image", 2, 64, "pt_ft", "", 1.0))
