import time

import pytest
import torch
from safetensors.torch import save_file

from mmlg_ray.method.ancestor import get_ancestor
from mmlg_ray.config import load_config
from mmlg_ray.errors import UserError


def test_pretrained_tag_fails_fast_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine that cannot reach the hub
    cfg = load_config(
        None,
        [
            "ancestor.source=open_clip",
            "ancestor.arch=ViT-B-16",
            "ancestor.pretrained=laion2b_s34b_b88k",
            f"cache_dir={tmp_path}",
        ],
    )
    t0 = time.time()
    with pytest.raises(UserError) as e:
        get_ancestor(cfg)
    assert time.time() - t0 < 10
    assert "cannot be downloaded" in str(e.value) and "ancestor.checkpoint" in str(e.value)


def test_unknown_tag_and_arch_are_named(tmp_path):
    cfg = load_config(None, ["ancestor.source=open_clip", "ancestor.arch=ViT-B-16", "ancestor.pretrained=nope"])
    with pytest.raises(UserError, match="ancestor.pretrained"):
        get_ancestor(cfg)
    with pytest.raises(UserError, match="ancestor.arch"):  # caught when the config is read
        load_config(None, ["ancestor.source=open_clip", "ancestor.arch=ViT-Q-99", "ancestor.pretrained=x"])


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_local_checkpoint_ancestor(tiny_cfg, tiny_ancestor, tmp_path, fmt):
    path = tmp_path / f"anc.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tiny_ancestor.state.items()}, str(path))
    else:
        torch.save({"state_dict": tiny_ancestor.state}, path)
    spec_sets = [f"ancestor.spec.{k}={v}" for k, v in tiny_ancestor.spec.model_dump().items() if v is not None]
    cfg = load_config(None, spec_sets + ["ancestor.source=checkpoint", f"ancestor.checkpoint={path}"])
    anc = get_ancestor(cfg)
    assert anc.fingerprint == tiny_ancestor.fingerprint
    bad = load_config(None, ["ancestor.source=checkpoint", f"ancestor.checkpoint={path}"])  # wrong spec
    with pytest.raises(UserError, match="does not match"):
        get_ancestor(bad)


def test_local_ancestor_is_cached_by_config(tiny_cfg, tiny_ancestor):
    again = get_ancestor(tiny_cfg)  # same config: read back from the cache, not re-trained
    assert again.fingerprint == tiny_ancestor.fingerprint
    assert again.cost["steps"] == tiny_cfg.ancestor.pretrain.steps


def test_chance_mean_recall_is_exact():
    """The analytic chance level equals the mean recall of random embeddings (many seeded draws),
    duplicate captions counted as correct as in evaluate.retrieval_metrics."""
    from mmlg_ray.method.ancestor import chance_mean_recall
    from mmlg_ray.method.evaluate import retrieval_metrics

    caps = [f"c{i}" for i in range(40)] + ["same"] * 5
    g = torch.Generator().manual_seed(0)
    draws = [
        retrieval_metrics(torch.randn(45, 8, generator=g), torch.randn(45, 8, generator=g), caps)["mean_recall"]
        for _ in range(400)
    ]
    assert abs(sum(draws) / len(draws) - chance_mean_recall(caps)) < 0.6
    assert abs(chance_mean_recall([str(i) for i in range(100)]) - 100 * (1 + 5 + 10) / 3 / 100) < 1e-9


def test_permutation_p_separates_knowledge_from_chance():
    """Embeddings that pair each image with its caption (plus noise) give the smallest p the test can give;
    unrelated embeddings give a p that is not small."""
    from mmlg_ray.method.ancestor import permutation_p
    from mmlg_ray.method.evaluate import retrieval_metrics

    g = torch.Generator().manual_seed(1)
    caps = [f"c{i}" for i in range(60)]
    txt = torch.nn.functional.normalize(torch.randn(60, 16, generator=g), dim=-1)
    img = torch.nn.functional.normalize(txt + 0.8 * torch.randn(60, 16, generator=g), dim=-1)
    p, n = permutation_p(img, txt, caps, retrieval_metrics(img, txt, caps)["mean_recall"], permutations=199)
    assert n == 199 and p == 1 / 200
    other = torch.nn.functional.normalize(torch.randn(60, 16, generator=g), dim=-1)
    p, _ = permutation_p(other, txt, caps, retrieval_metrics(other, txt, caps)["mean_recall"], permutations=199)
    assert p > 0.05


def test_local_ancestor_records_its_own_val_retrieval(tiny_cfg, tiny_ancestor):
    """Measured on Tux Paint's validation split (which no training stage sees), kept in meta.json and
    on the Ancestor, with its chance level."""
    m = tiny_ancestor.meta["tuxpaint_val"]
    assert m["split"] == "val" and 120 < m["pairs"] < 220
    assert 2.0 < m["chance_mean_recall"] < 6.0 and 0 <= m["mean_recall"] <= 100
    assert m["permutations"] == 999 and 1 / 1000 <= m["p_vs_chance"] <= 1
    # and on its corpus's held-out test split, each part apart, at most 500 pairs each
    held = tiny_ancestor.meta["corpus_test"]
    assert set(held) == {f"{p.kind}_test" for p in tiny_cfg.data.corpus.parts}
    for c in held.values():
        assert c["split"] == "test" and 0 < c["pairs"] <= 500 and c["permutations"] == 199
        assert 0 < c["chance_mean_recall"] < 100 and 1 / 200 <= c["p_vs_chance"] <= 1
    assert get_ancestor(tiny_cfg).meta["tuxpaint_val"] == m  # read back from the cache
