"""The report and the plan, built from a small finished sweep (the local backend's tables)."""
import pandas as pd
import pytest

from jobs import report as report_job
from jobs import sweep as sweep_job
from mmlg_ray.config import load_config


@pytest.fixture(scope="module")
def finished(tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_run")
    sets = tiny_overrides + ["descendants.grid.method=[mmlg,scratch,pt_ft]", "descendants.grid.modality=[image,text]",
                             "descendants.seeds=[0,1,2]", "descendants.finetune.steps=10",
                             "descendants.finetune.eval_every=5"]
    assert sweep_job.main(["--backend", "local", "--output", str(out)] + sum((["--set", s] for s in sets), [])) == 0
    return out


def test_report_has_every_section(finished):
    rep = finished / "report"
    html = (rep / "report.html").read_text()
    md = (rep / "report.md").read_text()
    for title in ["Score against descendant size: image_classification", "Score against descendant size: "
                  "text_classification", "Pre-training compute and storage against PT+FT",
                  "Pareto frontier, score against total cost", "Mean score and spread over seeds, per grid cell",
                  "MM-LG against each baseline", "Provenance: config, fingerprints, software"]:
        assert title in html and title in md, title
    assert html.count("data:image/png;base64,") == 5  # 2 score plots, costs, 2 Pareto plots: self-contained
    assert "<img" in html and 'src="http' not in html
    assert "fingerprint" in md and "ray " in md and "torch " in md
    anc = pd.read_json(finished / "ancestor.json", typ="series")
    assert anc["fingerprint"] in md
    cost = pd.read_parquet(rep / "cost.parquet")
    assert {"mmlg", "pt_ft"} <= set(cost.method)
    mm = cost.set_index("method").loc["mmlg"]
    assert 0 < mm.storage_vs_pt_ft and mm.pretrain_flops_measured > 0 and mm.pretrain_device_s_measured > 0
    # 3 seeds: the comparison runs a test instead of saying there are too few seeds
    assert "Welch t-tests over 3+ seeds" in md


def test_report_job_rebuilds_and_says_too_few_seeds(finished, tmp_path):
    trials = pd.read_parquet(finished / "trials.parquet")
    small = tmp_path / "small"
    small.mkdir()
    for f in ("stages.parquet", "history.parquet", "config.yaml", "ancestor.json"):
        (small / f).write_bytes((finished / f).read_bytes())
    trials[trials.seed < 2].to_parquet(small / "trials.parquet")
    assert report_job.main([str(small)]) == 0
    md = (small / "report" / "report.md").read_text()
    assert "too few seeds (n=2) to tell" in md


def test_report_job_refuses_a_folder_without_results(tmp_path, capsys):
    assert report_job.main([str(tmp_path)]) == 2
    assert "trials.parquet" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    assert sweep_job.main(["--dry-run", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    cfg = load_config(None)
    n_cells = 3 * len(cfg.descendants.grid.depth) * len(cfg.descendants.grid.width) * len(cfg.descendants.grid.method)
    n_trials = n_cells * (cfg.ray.tune.num_samples + len(cfg.descendants.seeds) - 1)
    assert f"{n_cells} grid cells, {n_trials} trials" in text
    assert "device-hours" in text and "extraction" in text and "FLOPs" in text
    assert not out.exists()


def test_paper_plan_prices_a_gpu_cluster(capsys):
    assert sweep_job.main(["--dry-run", "--config", "configs/paper_vitb16.yaml", "--set", "report.device=h100",
                           "--set", "report.dtype=bf16"]) == 0
    text = capsys.readouterr().out
    assert "h100 device-hours" in text and "149,620,737" in text  # the full-size ViT-B/16 descendant
    assert sweep_job.main(["--dry-run", "--set", "report.device=tpu9"]) == 2
