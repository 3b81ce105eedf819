import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from jobs import descend as descend_job
from mmlg_ray.config import ModelSpec
from mmlg_ray.method.descend import descendant_spec, init_descendant
from mmlg_ray.method.learngene import load_learngene
from mmlg_ray.method.models import build_model

METHODS_WITH_ANCESTOR = ["weight_selection", "heur_lg", "scratch"]


def test_descend_job_output_loads_in_open_clip(tiny_learngene_path, tmp_path):
    out = tmp_path / "desc"
    rc = descend_job.main(
        [
            "--learngene",
            str(tiny_learngene_path),
            "--modality",
            "image_text",
            "--image-depth",
            "3",
            "--text-depth",
            "2",
            "--width",
            "64",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["layers"] == 3 and cfg["model_cfg"]["text_cfg"]["layers"] == 2
    model = open_clip.create_model(f"local-dir:{out}")
    # open_clip loaded exactly the learngene's expansion
    lg = load_learngene(tiny_learngene_path)
    expected = lg.expand("image", 3, 64)
    state = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v)
    spec = lg.meta.model_spec
    img = torch.randn(2, 3, spec.image_size, spec.image_size)
    txt = open_clip.tokenize(["a photo of a bag.", "a sandal"], context_length=spec.context_length)
    f_img, f_txt, scale = model(img, txt)
    assert f_img.shape == (2, spec.embed_dim) and torch.isfinite(f_txt).all()


@pytest.mark.parametrize("modality, prefix", [("image", "visual."), ("text", "transformer.")])
def test_single_tower_descendants_use_clip_names(tiny_learngene_path, tmp_path, modality, prefix):
    out = tmp_path / modality
    assert (
        descend_job.main(
            ["--learngene", str(tiny_learngene_path), "--modality", modality, "--depth", "2", "--out", str(out)]
        )
        == 0
    )
    names = set(load_file(str(out / "open_clip_model.safetensors")))
    clip_names = set(
        build_model(
            load_learngene(tiny_learngene_path).meta.model_spec.model_copy(update=dict(image_depth=2, text_depth=2))
        ).state_dict()
    )
    assert names <= clip_names
    assert any(n.startswith(prefix) for n in names)
    if modality == "image":
        assert all(n.startswith("visual.") for n in names)
    else:
        assert not any(n.startswith("visual.") for n in names)


def test_descend_job_rejects_bad_width(tiny_learngene_path, tmp_path, capsys):
    assert (
        descend_job.main(
            [
                "--learngene",
                str(tiny_learngene_path),
                "--modality",
                "image",
                "--width",
                "100",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "--width" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", METHODS_WITH_ANCESTOR)
def test_ancestor_based_init(tiny_ancestor, method):
    spec = descendant_spec(tiny_ancestor.spec, 1, 64)
    m = init_descendant(
        method,
        "image_text",
        spec,
        ancestor_state=tiny_ancestor.state,
        ancestor_spec=tiny_ancestor.spec,
        heur_lg_layers=1,
    )
    s = m.state_dict()
    w_anc = tiny_ancestor.state["visual.transformer.resblocks.0.mlp.c_fc.weight"]
    w_last = tiny_ancestor.state["visual.transformer.resblocks.1.mlp.c_fc.weight"]
    from mmlg_ray.method.select import select_layer_tensor

    got = s["visual.transformer.resblocks.0.mlp.c_fc.weight"]
    if method == "weight_selection":  # first layers
        torch.testing.assert_close(got, select_layer_tensor("mlp.c_fc.weight", w_anc, 128, 64, 64))
    elif method == "heur_lg":  # the ancestor's last layer on top
        torch.testing.assert_close(got, select_layer_tensor("mlp.c_fc.weight", w_last, 128, 64, 64))
    else:
        assert got.shape == (256, 64)
        assert not torch.allclose(got, select_layer_tensor("mlp.c_fc.weight", w_anc, 128, 64, 64))


def test_descendant_spec_keeps_text_ratio():
    anc = ModelSpec(image_width=768, text_width=512, image_depth=12, text_depth=12)
    s = descendant_spec(anc, 6, 384)
    assert (s.image_width, s.text_width, s.image_depth) == (384, 256, 6)
    assert s.heads("image") == 6 and s.heads("text") == 4


def test_finetune_resumes_from_a_snapshot_of_its_evaluation(tiny_cfg, tiny_ancestor):
    """The snapshot handed to on_eval (what a Tune trial checkpoints) holds everything to continue:
    resuming restores weights, optimizer, schedule and history, then trains only the remaining steps."""
    import copy

    import torch

    from mmlg_ray.method.descend import descendant_spec, init_descendant
    from mmlg_ray.method.finetune import finetune, load_task_data

    spec = descendant_spec(tiny_ancestor.spec, 1, 64)
    data = load_task_data(tiny_cfg, "image", spec.image_size)
    fcfg = tiny_cfg.descendants.finetune.model_copy(update={"steps": 20, "eval_every": 10, "linear_probe": False})

    def fresh():
        return init_descendant("scratch", "image", spec, seed=0)

    snaps = {}
    full = finetune(
        fresh(),
        "image",
        data,
        fcfg,
        spec,
        torch.device("cpu"),
        on_eval=lambda step, m, snap: snaps.setdefault(step, copy.deepcopy(snap())),
    )
    snap = snaps[10]
    assert snap["step"] == 10 and len(snap["history"]) == 1 and snap["engine"]["scheduler"]["last_epoch"] == 10
    # resumed at its own last step: nothing left to train, the weights are the snapshot's
    model = fresh()
    done = finetune(
        model,
        "image",
        data,
        fcfg.model_copy(update={"steps": 10}),
        spec,
        torch.device("cpu"),
        resume=copy.deepcopy(snap),
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["model"][f"backbone.{k}"])
    assert done["history"] == snap["history"] and done["resumed_from_step"] == 10
    # resumed mid-way: the remaining 10 steps only, one history row per step, counters continued
    out = finetune(fresh(), "image", data, fcfg, spec, torch.device("cpu"), resume=copy.deepcopy(snap))
    assert [h["step"] for h in out["history"]] == [10, 20] and out["history"][0] == full["history"][0]
    # the same batches as the uninterrupted run: the same result, to the bit on CPU
    assert out["history"][1] == full["history"][1]
    assert out["samples"] == full["samples"] and out["steps"] == 20 and out["resumed_from_step"] == 10
    assert out["seconds"] >= snap["seconds"]
