"""Tiny end-to-end run on the real packaged data, in one process (no Ray)."""

import pandas as pd
import pytest

from jobs import sweep as sweep_job
from mmlg_ray.config import METHODS

CHANCE = {"image": 10.0, "text": None, "image_text": None}


@pytest.fixture(scope="module")
def local_run(tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_run")
    rc = sweep_job.main(
        ["--backend", "local", "--output", str(out)]
        + sum(
            (
                ["--set", o]
                for o in tiny_overrides
                + [
                    f"descendants.grid.method=[{','.join(METHODS)}]",
                    "descendants.grid.modality=[image,text,image_text]",
                    "descendants.grid.extraction=[fixed,elastic]",
                    "descendants.pt_budgets=[0.5,1]",
                    "descendants.finetune.steps=40",
                    "descendants.finetune.eval_every=20",
                    # one search trial per cell, at the configured fine-tuning hyper-parameters (a one-point range)
                    "ray.tune.num_samples=1",
                    "ray.tune.search_space.lr=[0.0005,0.0005]",
                    "ray.tune.search_space.weight_decay=[0.05,0.05]",
                ]
            ),
            [],
        )
    )
    assert rc == 0
    return out


ARMS = {
    "mmlg",
    "mmlg/elastic",
    "tleg",
    "tleg/elastic",
    "weight_selection",
    "heur_lg",
    "scratch",
    "pt_ft@0.5x",
    "pt_ft@1x",
    "csm",
}


def test_every_method_and_modality_runs(local_run):
    trials = pd.read_parquet(local_run / "trials.parquet")
    assert len(trials) == len(ARMS) * 3
    assert set(trials.method) == set(METHODS) and set(trials.arm) == ARMS
    assert set(trials[trials.method.isin(["mmlg", "tleg"])].extraction) == {"fixed", "elastic"}
    assert set(trials[trials.method == "pt_ft"].pt_budget) == {0.5, 1.0}
    assert trials.final_score.notna().all()
    hist = pd.read_parquet(local_run / "history.parquet")
    assert len(hist) == 2 * len(trials)
    stages = pd.read_parquet(local_run / "stages.parquet")
    assert {"ancestor", "extraction", "pretrain"} <= set(stages.stage)
    assert (stages[stages.stage == "extraction"].flops > 0).all()
    # pt_ft carries its pre-training cost; learngene methods do not pay one per descendant
    pt = trials[trials.method == "pt_ft"]
    assert (pt.pretrain_flops > 0).all() and (trials[trials.method == "mmlg"].pretrain_flops == 0).all()
    # the budget ladder: twice the budget, twice the pre-training compute, for the same shape
    for _, g in pt.groupby(["modality", "depth", "width"]):
        f = g.groupby("pt_budget").pretrain_flops.first()
        assert f[1.0] == pytest.approx(2 * f[0.5], rel=1e-6)
    assert len(stages[stages.stage == "extraction"]) == 4  # mmlg and tleg, fixed and elastic
    shapes = len(trials[["depth", "width"]].drop_duplicates())
    assert len(stages[stages.stage == "pretrain"]) == 3 * shapes  # 2 pt_ft budgets + csm, each shape


def test_every_best_is_chosen_on_validation(local_run):
    """best_* is the test score at the evaluation with the best *validation* score, val_score is the
    last evaluation's, and test scores never choose anything."""
    trials = pd.read_parquet(local_run / "trials.parquet")
    hist = pd.read_parquet(local_run / "history.parquet")
    assert trials.val_score.notna().all() and hist.val_score.notna().all()
    for _, t in trials.iterrows():
        h = hist[hist.trial == t.trial].sort_values("step")
        at = h.loc[h.val_score.idxmax()]
        assert t.best_val_score == at.val_score and t.best_score == at.score and t.best_step == at.step
        assert t.val_score == h.val_score.iloc[-1] and t.final_score == h.score.iloc[-1]


def test_mmlg_descendant_scores_above_chance(local_run, tiny_overrides):
    trials = pd.read_parquet(local_run / "trials.parquet")
    mm = trials[trials.arm == "mmlg"].set_index("modality")
    assert mm.loc["image", "final_top1"] > 2 * 10.0  # 10 MNIST classes
    # caption -> stamp category: above what predicting the test split's most frequent category scores
    from mmlg_ray.config import load_config
    from mmlg_ray.data import load_dataset

    cfg = load_config(None, tiny_overrides)
    test = load_dataset(cfg.data.text_classification, "test", image_size=16, cache_dir=cfg.cache_path)
    majority = 100 * float(test.labels.bincount().max()) / len(test)
    assert 20 < majority < 50 and mm.loc["text", "final_accuracy"] > majority
    # retrieval over the ~170 test pairs: above the exact chance mean recall of R@1/5/10 (about 3.5%)
    from mmlg_ray.method.ancestor import chance_mean_recall

    pairs = load_dataset(cfg.data.retrieval, "test", image_size=16, cache_dir=cfg.cache_path)
    assert mm.loc["image_text", "final_mean_recall"] > max(4.0, chance_mean_recall(pairs.captions))


def test_stages_are_reused_on_rerun(local_run, tiny_overrides, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="mmlg_ray")
    before = sorted(p.name for p in (local_run / "learngenes").iterdir())
    rc = sweep_job.main(
        ["--backend", "local", "--output", str(local_run)]
        + sum(
            (
                ["--set", o]
                for o in tiny_overrides + ["descendants.finetune.steps=2", "descendants.finetune.eval_every=2"]
            ),
            [],
        )
    )
    assert rc == 0
    assert sorted(p.name for p in (local_run / "learngenes").iterdir()) == before
    assert "reusing cached pre-trained CLIP" in caplog.text
    assert "[extract/" not in caplog.text
