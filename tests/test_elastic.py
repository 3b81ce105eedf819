"""Elastic extraction: besides the auxiliary model, every step distils descendant shapes of the grid
(largest, smallest, a random one), each expanded from the learngene exactly as a descendant is."""

from __future__ import annotations

import math

import pytest
import torch

from mmlg_ray.engine import pipeline
from mmlg_ray.method.ancestor import Ancestor
from mmlg_ray.config import load_config
from mmlg_ray.method.descend import descendant_spec, init_descendant
from mmlg_ray.method.learngene import load_learngene, save_learngene, state_fingerprint
from mmlg_ray.method.models import build_model
from mmlg_ray.method.train import distill_loss

GRID = ["descendants.grid.depth=[1,2]", "descendants.grid.width=[64,128]"]


def _cfg(tiny_overrides, *more):
    return load_config(None, tiny_overrides + GRID + list(more))


def test_plan_is_the_sandwich_rule_and_depends_only_on_seed_and_step(tiny_cfg):
    cfg = load_config(None, ["descendants.grid.depth=[1,2,3]", "descendants.grid.width=[64,128]"])
    plan = pipeline.elastic_plan(cfg, cfg.ancestor.spec)
    draws = [plan.at(s) for s in range(40)]
    assert all(d[:2] == ["d3w128", "d1w64"] and len(d) == 3 == len(set(d)) for d in draws)
    assert {d[2] for d in draws} == {"d1w128", "d2w64", "d2w128", "d3w64"}  # the rest, at random
    again = pipeline.elastic_plan(cfg, cfg.ancestor.spec)
    assert [again.at(s) for s in range(40)] == draws  # a resumed run draws what it would have drawn
    other = pipeline.elastic_plan(
        load_config(None, ["seed=1", "descendants.grid.depth=[1,2,3]", "descendants.grid.width=[64,128]"]),
        cfg.ancestor.spec,
    )
    assert [other.at(s) for s in range(40)] != draws
    # each shape is the descendant the sweep builds at that grid point
    assert plan.specs["d2w64"] == descendant_spec(cfg.ancestor.spec, 2, 64)
    # a grid of at most `count` shapes is distilled whole every step
    small = pipeline.elastic_plan(
        load_config(None, ["descendants.grid.depth=[1,2]", "descendants.grid.width=[128]"]), cfg.ancestor.spec
    )
    assert all(sorted(small.at(s)) == ["d1w128", "d2w128"] for s in range(5))


def test_cache_keys_keep_fixed_and_elastic_apart(tiny_cfg):
    cfg = load_config(None, [])
    fixed, elastic = pipeline.learngene_name(cfg, "mmlg"), pipeline.learngene_name(cfg, "mmlg", "elastic")
    assert fixed != elastic and "-elastic-" in elastic and "elastic" not in fixed
    # the fixed learngene does not depend on the elastic settings nor on the grid; the elastic one does
    changed = load_config(None, ["learngene.extraction.elastic_weight=0.5", "descendants.grid.width=[64,128]"])
    assert pipeline.learngene_name(changed, "mmlg") == fixed
    assert pipeline.learngene_name(changed, "mmlg", "elastic") != elastic
    assert pipeline.learngene_name(load_config(None, ["descendants.grid.depth=[1,3]"]), "mmlg", "elastic") != elastic
    from mmlg_ray.errors import UserError

    with pytest.raises(UserError, match="extraction mode"):
        pipeline.learngene_name(cfg, "mmlg", "slimmable")


@pytest.mark.parametrize("method", ["mmlg", "tleg"])
def test_elastic_shape_is_exactly_the_descendant_and_trains_the_learngene(tiny_overrides, tmp_path, method):
    """What a sampled shape computes during extraction is what init_descendant builds from the saved
    learngene, and its loss reaches every learngene tensor and the inherited ones."""
    cfg = _cfg(tiny_overrides)
    spec = cfg.ancestor.spec
    torch.manual_seed(0)
    state = {k: v for k, v in build_model(spec).state_dict().items() if k != "attn_mask"}
    anc = Ancestor(spec, state, state_fingerprint(state), "random")
    aux = pipeline.build_aux(cfg, anc, method, fit=False, mode="elastic")
    with torch.no_grad():  # break the schedule's symmetry: unimodal blocks start at zero
        for p in aux.learngene.tensors.values():
            p.add_(0.02 * torch.randn_like(p))
    save_learngene(tmp_path / "lg.safetensors", aux.learngene, aux.inherited_state())
    lg = load_learngene(tmp_path / "lg.safetensors")
    images, tokens = (
        torch.randn(3, 3, spec.image_size, spec.image_size),
        torch.randint(1, 999, (3, spec.context_length)),
    )
    for key, (d, w) in {"d1w64": (1, 64), "d2w128": (2, 128)}.items():
        model = init_descendant(method, "image_text", descendant_spec(spec, d, w), learngene=lg).eval()
        ours, theirs = aux.shape_forward(key, images, tokens), model(images, tokens)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
    img, txt, scale = aux(images, tokens, shapes=["d2w64"])[1]  # depth 2: b(1, 2) = 1/2 reaches U
    (img.sum() + txt.sum() + scale).backward()
    no_grad = [n for n, p in aux.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not [n for n in no_grad if n.startswith("learngene.") and "coeff" not in n]
    assert "clip.visual.conv1.weight" not in no_grad and "clip.token_embedding.weight" not in no_grad


@pytest.mark.slow  # two extractions each
@pytest.mark.parametrize("method", ["mmlg", "tleg"])
def test_elastic_learngene_starts_the_smallest_shape_closer_to_the_teacher(
    tiny_overrides, tiny_ancestor, tmp_path, method
):
    """Same steps, same data: the smallest grid shape (depth 1, width 64) expanded from the elastic
    learngene imitates the teacher better than from the fixed one, and better than at the start.
    Measured (20 steps, 3 seeds): distillation loss fixed 1.43-1.50, elastic 0.95-1.00 (mmlg),
    0.51-0.56 (tleg); warm start 1.52. The two files hold the same tensors."""
    cfg = _cfg(tiny_overrides, "learngene.extraction.steps=20", "learngene.extraction.log_every=10")
    anc = tiny_ancestor
    teacher = anc.model()
    batches = pipeline.corpus(cfg).batches(64, anc.spec.image_size, anc.spec.context_length, seed=123)
    held = [next(batches) for _ in range(2)]

    @torch.no_grad()
    def smallest_distill(lg):
        model = init_descendant(method, "image_text", descendant_spec(anc.spec, 1, 64), learngene=lg).eval()
        return sum(float(distill_loss(*model(x, t), *teacher(x, t))) for x, t, _ in held) / len(held)

    start = pipeline.build_aux(cfg, anc, method)
    save_learngene(tmp_path / "start.safetensors", start.learngene, start.inherited_state())
    loss, costs, files = {"start": smallest_distill(load_learngene(tmp_path / "start.safetensors"))}, {}, {}
    for mode in ("fixed", "elastic"):
        path = tmp_path / f"{mode}.safetensors"
        costs[mode] = pipeline.extract(cfg, anc, path, method=method, device=torch.device("cpu"), mode=mode)
        files[mode] = load_learngene(path)
        loss[mode] = smallest_distill(files[mode])
    assert loss["elastic"] < 0.8 * loss["fixed"] and loss["elastic"] < 0.8 * loss["start"], loss
    fixed, elastic = files["fixed"], files["elastic"]
    assert {k: v.shape for k, v in fixed.tensors.items()} == {k: v.shape for k, v in elastic.tensors.items()}
    assert fixed.meta.__dict__.keys() == elastic.meta.__dict__.keys()
    assert (fixed.meta.extraction_mode, elastic.meta.extraction_mode) == ("fixed", "elastic")
    assert elastic.meta.extraction["elastic"]["widths"] == [64, 128]
    # the cost counts the shapes' training: 2 of the 4 grid shapes every step, + 1 at random
    plan = pipeline.elastic_plan(cfg, anc.spec)
    assert costs["elastic"]["elastic_flops"] == plan.train_flops(20, cfg.learngene.extraction.batch_size) > 0
    assert costs["elastic"]["flops"] == costs["fixed"]["flops"] + costs["elastic"]["elastic_flops"]
    assert costs["fixed"]["elastic_flops"] == 0 and costs["elastic"]["extraction_mode"] == "elastic"


def test_elastic_extraction_runs_in_bf16(tiny_overrides, tiny_ancestor, tmp_path):
    cfg = _cfg(tiny_overrides, "precision=bf16", "learngene.extraction.steps=3", "learngene.extraction.log_every=1")
    path = tmp_path / "lg.safetensors"
    cost = pipeline.extract(cfg, tiny_ancestor, path, device=torch.device("cpu"), mode="elastic")
    assert cost["precision"] == "bf16" and math.isfinite(cost["final_loss"]) and cost["elastic_flops"] > 0
    assert math.isfinite(cost["final_elastic_loss"])
    lg = load_learngene(path)
    assert lg.meta.extraction_mode == "elastic"
    assert {t.dtype for t in lg.tensors.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in lg.tensors.values())
