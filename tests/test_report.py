"""The report and the plan, built from a small finished sweep (the local backend's tables)."""

import functools
import os
from pathlib import Path

import pandas as pd
import pytest

from jobs import report as report_job
from jobs import sweep as sweep_job
from mmlg_ray.config import load_config


@functools.lru_cache(maxsize=4)
def _sections(out: str) -> list:
    """The report's sections for the results in `out`, built once per folder (plots included)."""
    from mmlg_ray.report import SECTIONS, load_report_data

    d = load_report_data(out)
    return [sec for build in SECTIONS for sec in build(d)]


def outline(out) -> dict:
    """The report's structure, not its words: {section key: [block descriptors]} (a paragraph by its
    key in mmlg_ray/templates/report_texts.yaml, a figure by its file, a table by its columns); a
    section built more than once (one per task) has its blocks listed in turn."""
    found: dict = {}
    for sec in _sections(str(out)):
        for b in sec.blocks:
            if b.kind == "para":
                desc = ("para", b.key)
            elif b.kind == "figure":
                desc = ("figure", b.name)
            else:
                desc = (b.kind, tuple(b.df.columns) if b.kind == "table" else "")
            found.setdefault(sec.key, []).append(desc)
    return found


def paras(o: dict, key: str) -> list:
    return [k for kind, k in o.get(key, []) if kind == "para"]


@pytest.fixture(scope="module")
def finished(tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_run")
    sets = tiny_overrides + [
        "descendants.grid.method=[mmlg,scratch,pt_ft]",
        "descendants.grid.modality=[image,text]",
        "descendants.seeds=[0,1,2]",
        "descendants.finetune.steps=10",
        "descendants.finetune.eval_every=5",
    ]
    assert sweep_job.main(["--backend", "local", "--output", str(out)] + sum((["--set", s] for s in sets), [])) == 0
    return out


def outline_blocks(out, key: str) -> list:
    return [b for sec in _sections(str(out)) if sec.key == key for b in sec.blocks]


def outline_table(out, key: str) -> pd.DataFrame:
    return next(b for b in outline_blocks(out, key) if b.kind == "table").df


def test_report_has_every_section(finished):
    rep = finished / "report"
    html = (rep / "report.html").read_text()
    md = (rep / "report.md").read_text()
    from mmlg_ray.report.texts import title

    o = outline(finished)
    assert list(o) == [
        "reading",
        "scores",
        "spend",
        "cost_to_target",
        "pretraining",
        "pareto",
        "cells",
        "comparisons",
        "fixed_vs_elastic",
        "equal_accuracy",
        "timeline",
        "plan",
        "provenance",
    ]
    for key in o:  # each section rendered in both outputs under its title
        t = title(key, task="image_classification")
        assert t in html and t in md, key
    assert ("figure", "score_vs_params_text_classification.png") in o["scores"]
    assert [f for kind, f in o["pareto"] if kind == "figure"] == [
        "pareto_image_classification.png",
        "pareto_text_classification.png",
    ]
    # 2 score plots, spend, 2 score-vs-money plots, costs, 2 Pareto plots, equal accuracy, the stage
    # timeline: self-contained
    assert html.count("data:image/png;base64,") == 10
    assert "<img" in html and 'src="http' not in html
    # the contents list each section present, one entry per task under its group
    import re

    anchors = re.findall(r'<section id="([^"]+)">', html)
    nav = html.split("<nav", 1)[1].split("</nav>", 1)[0]
    assert len(anchors) == len(set(anchors)) and all(f'href="#{a}"' in nav for a in anchors)
    assert nav.count(">image_classification<") == 2 and nav.count(">text_classification<") == 2
    # money per arm and stage: one extraction for mmlg, one pre-training per shape for pt_ft (its image
    # and text descendants share it), every trial's fine-tuning
    spend = pd.read_parquet(rep / "spend.parquet")
    stages = pd.read_parquet(finished / "stages.parquet")
    trials = pd.read_parquet(finished / "trials.parquet")
    ext = spend[(spend.arm == "mmlg") & (spend.stage == "extraction")]
    assert ext.runs.tolist() == [1] and ext.device_s.iloc[0] == pytest.approx(
        stages[(stages.stage == "extraction") & (stages.name == "mmlg")].device_s.sum()
    )
    pre = spend[(spend.arm == "pt_ft@1x") & (spend.stage == "pretrain")]
    assert (
        pre.runs.iloc[0]
        == (stages.stage == "pretrain").sum()
        == trials[trials.method == "pt_ft"][["depth", "width"]].drop_duplicates().shape[0]
    )
    fine = spend[spend.stage == "finetune"]
    assert fine.device_s.sum() == pytest.approx(trials.finetune_device_s.sum()) and (fine.money > 0).all()
    assert paras(o, "spend") == ["spend", "sharing_rule"] and ("figure", "spend.png") in o["spend"]
    assert [kind for kind, _ in o["plan"]] == ["para", "bullets", "table"]
    plan = outline_table(finished, "plan")
    assert plan.quantity.tolist() == ["trials", "fine-tuning FLOPs", "trials stopped early"]
    assert plan.set_index("quantity").loc["trials", "run"] == len(trials)
    target = pd.read_parquet(rep / "cost_to_target.parquet")
    assert set(target.task) == {"image_classification", "text_classification"}
    assert target.groupby(["task", "target"]).cheapest.sum().eq(1).all()
    assert "fingerprint" in md and "ray " in md and "torch " in md
    anc = pd.read_json(finished / "ancestor.json", typ="series")
    assert anc["fingerprint"] in md
    own = anc["own_retrieval"]["tuxpaint_val"]  # the ancestor's own Tux Paint val retrieval, in the report
    prov = next(b for b in outline_blocks(finished, "provenance") if b.kind == "bullets").items
    ret = [x for x in prov if f"{own['mean_recall']:.1f}" in x and f"{own['chance_mean_recall']:.1f}" in x]
    assert len(ret) == 1 and any(anc["fingerprint"] in x for x in prov)
    cost = pd.read_parquet(rep / "cost.parquet")
    assert {"mmlg", "pt_ft"} <= set(cost.method)
    mm = cost.set_index("method").loc["mmlg"]
    assert 0 < mm.storage_vs_pt_ft and mm.pretrain_flops_measured > 0 and mm.pretrain_device_s_measured > 0
    # MM-LG's stored parameters are its learngene file's, exactly (shared block, unimodal blocks, inherited)
    from mmlg_ray.method.learngene import load_learngene

    st = pd.read_parquet(finished / "stages.parquet")
    lg_file = load_learngene(st[(st.stage == "extraction") & (st.name == "mmlg")].artifact.iloc[0])
    assert mm.stored_params == sum(t.numel() for t in lg_file.tensors.values())
    # 3 seeds: the comparison runs a test instead of saying there are too few seeds
    comp = pd.read_parquet(rep / "comparisons.parquet")
    assert comp.p_welch.notna().all() and (comp.p_holm >= comp.p_welch).all()
    assert (comp[["n_arm", "n_vs"]].min(axis=1) >= 3).all()
    # the local backend runs the same search as Ray's: chosen on validation, common candidates per shape
    assert paras(o, "reading") == ["selection_val", "seed_note", "statistics", "costs_exact"]


def test_report_job_rebuilds_and_says_too_few_seeds(finished, tmp_path):
    trials = pd.read_parquet(finished / "trials.parquet")
    small = tmp_path / "small"
    small.mkdir()
    for f in ("stages.parquet", "history.parquet", "config.yaml", "ancestor.json"):
        (small / f).write_bytes((finished / f).read_bytes())
    trials[trials.seed < 2].to_parquet(small / "trials.parquet")
    assert report_job.main([str(small)]) == 0
    comp = pd.read_parquet(small / "report" / "comparisons.parquet")
    assert len(comp) and comp.p_welch.isna().all() and (comp[["n_arm", "n_vs"]].min(axis=1) == 2).all()
    assert (small / "report" / "report.md").stat().st_size > 0


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


def test_dry_run_checks_what_the_real_run_checks(tmp_path, capsys):
    """A corrupt ancestor.checkpoint is refused by the dry run as by the real one (exit 2, the field
    named, no plan printed); the plan says where a checkpoint ancestor's weights come from."""
    bad = tmp_path / "ancestor.safetensors"
    bad.write_bytes(os.urandom(1000))
    sets = ["--set", "ancestor.source=checkpoint", "--set", f"ancestor.checkpoint={bad}"]
    assert sweep_job.main(["--dry-run", "--output", str(tmp_path / "dry"), *sets]) == 2
    cap = capsys.readouterr()
    assert "ancestor.checkpoint" in cap.err and "grid cells" not in cap.out
    assert not (tmp_path / "dry").exists()
    from mmlg_ray.engine.plan import format_plan, make_plan

    cfg = load_config(None, ["ancestor.source=checkpoint", f"ancestor.checkpoint={bad}"])
    text = format_plan(make_plan(cfg, backend="ray"))
    assert f"read from ancestor.checkpoint ({bad})" in text and "downloaded" not in text


def test_paper_plan_prices_a_gpu_cluster(capsys):
    assert sweep_job.main(["--dry-run", "--config", "configs/paper_vitb16.yaml", "--set", "report.device=h100"]) == 0
    text = capsys.readouterr().out
    assert "h100 device-hours" in text and "149,620,737" in text  # the full-size ViT-B/16 descendant
    assert sweep_job.main(["--dry-run", "--set", "report.device=tpu9"]) == 2


# --------------------------------------------------------------------------- constructed results (no training)
NOISE = (-0.5, 0.0, 0.5)  # seeds 0, 1, 2: the mean is the centre exactly


def _row(
    method,
    seed,
    test,
    val,
    *,
    phase="seeds",
    extraction="",
    budget=0.0,
    arm=None,
    lr=1e-3,
    pre=0.0,
    status="ok",
    modality="image",
    depth=2,
    width=64,
):
    task = {"image": "image_classification", "text": "text_classification"}[modality]
    return {
        "trial": f"{method}-{extraction}-{budget}-{seed}-{lr}",
        "method": method,
        "modality": modality,
        "task": task,
        "dataset": "constructed",
        "depth": depth,
        "width": width,
        "params": 1000 * width,
        "seed": seed,
        "lr": lr,
        "weight_decay": 0.0,
        "score_metric": "top1",
        "final_score": test,
        "final_top1": test,
        "val_score": val,
        "best_val_score": val,
        "phase": phase,
        "status": status,
        "finetune_flops": 1e9,
        "pretrain_flops": pre,
        "pretrain_device_s": pre / 1e10,
        "extraction": extraction,
        "pt_budget": budget,
        "arm": arm or method,
    }


def constructed_trials():
    """One cell (image, depth 2, width 64). PT+FT's ladder is linear in log compute: 40 + 10 points per
    doubling from 1e11 FLOPs (budget 0.25x) to 8e11 (2x). mmlg (fixed) scores 55: PT+FT reaches it at
    2e11 * sqrt(2) FLOPs; mmlg's extraction cost 1e11 and serves this one cell. mmlg/elastic scores 90
    (PT+FT never reaches it), tleg 30 (PT+FT beats it at every budget), scratch 45.
    In every arm's search the trial with the best validation score (lr 1e-3) is not the one with the
    best test score (lr 1e-2, whose test score is 99): selection on validation must ignore it."""
    rows = []
    arms = [
        ("mmlg", "fixed", 0.0, "mmlg", 55.0, 0.0),
        ("mmlg", "elastic", 0.0, "mmlg/elastic", 90.0, 0.0),
        ("tleg", "fixed", 0.0, "tleg", 30.0, 0.0),
        ("scratch", "", 0.0, "scratch", 45.0, 0.0),
    ]
    arms += [("pt_ft", "", b, f"pt_ft@{b:g}x", 40.0 + 10 * k, 1e11 * 2**k) for k, b in enumerate((0.25, 0.5, 1.0, 2.0))]
    for method, ext, budget, arm, score, pre in arms:
        kw = dict(extraction=ext, budget=budget, arm=arm, pre=pre)
        rows.append(_row(method, 0, score + NOISE[0], 80.0, phase="search", **kw))
        rows.append(_row(method, 0, 99.0, 10.0, phase="search", lr=1e-2, **kw))  # best test, worst val
        rows.append(_row(method, 0, 99.0, 99.0, phase="search", lr=3e-2, status="error", **kw))  # never counts
        rows += [_row(method, s, score + NOISE[s], 80.0, **kw) for s in (1, 2)]
    return pd.DataFrame(rows)


def constructed_stages():
    return pd.DataFrame(
        [
            {"stage": "ancestor", "name": "local", "flops": 5e12, "device_s": 100.0, "wall_s": 100.0, "artifact": ""},
            {"stage": "extraction", "name": "mmlg", "flops": 1e11, "device_s": 10.0, "wall_s": 10.0, "artifact": "x"},
            {
                "stage": "extraction",
                "name": "mmlg/elastic",
                "flops": 3e11,
                "device_s": 30.0,
                "wall_s": 30.0,
                "artifact": "x",
            },
            {"stage": "extraction", "name": "tleg", "flops": 1e11, "device_s": 10.0, "wall_s": 10.0, "artifact": "x"},
        ]
        + [
            {
                "stage": "pretrain",
                "name": f"pt_ft/i2x64-t2x32@{b:g}x",
                "flops": 1e11 * 2**k,
                "device_s": 10.0 * 2**k,
                "wall_s": 1.0,
                "artifact": "",
            }
            for k, b in enumerate((0.25, 0.5, 1.0, 2.0))
        ]
    )


def test_selection_uses_validation_never_test():
    from mmlg_ray.report import final_trials, selection_split

    t = constructed_trials()
    ft = final_trials(t)
    assert selection_split(t) == "val"
    assert (ft.lr == 1e-3).all() and (ft.status != "error").all()
    assert len(ft) == 8 * 3 and ft.groupby("arm").seed.nunique().eq(3).all()
    assert ft[ft.arm == "mmlg"].final_score.mean() == pytest.approx(55.0)
    # old results (no val_score): the test split chooses, and selection_split says so
    old = t.drop(columns=["val_score", "best_val_score", "arm", "extraction", "pt_budget"])
    assert selection_split(old) == "test"
    assert (final_trials(old).lr == 1e-2).sum() > 0


def test_constructed_report_has_savings_at_equal_accuracy(tmp_path):
    import math

    from mmlg_ray.report import build_report

    out = tmp_path / "run"
    out.mkdir()
    constructed_trials().to_parquet(out / "trials.parquet")
    constructed_stages().to_parquet(out / "stages.parquet")
    rep = build_report(out)
    md = (rep / "report.md").read_text()
    o = outline(out)
    assert paras(o, "reading") == ["selection_val", "seed_note", "statistics", "costs_exact"]
    assert [kind for kind, _ in o["equal_accuracy"]] == ["para", "para", "bullets", "table", "figure"]
    assert paras(o, "equal_accuracy") == ["equal_accuracy", "equal_accuracy_method"]
    assert "equal_accuracy.png" in md and (rep / "equal_accuracy.png").is_file()
    fve = [k for kind, k in o["fixed_vs_elastic"]]
    assert fve[0] == "fixed_vs_elastic" and {"fixed mean", "elastic mean", "diff 95% CI"} <= set(fve[1])
    eq = pd.read_parquet(rep / "equal_accuracy.parquet").set_index("arm")
    mm = eq.loc["mmlg"]
    assert mm.kind == "crossing" and mm.pt_ft_flops == pytest.approx(2e11 * math.sqrt(2))
    assert mm.arm_flops == pytest.approx(1e11) and mm.saved_flops == pytest.approx(2e11 * math.sqrt(2) - 1e11)
    assert mm.pt_ft_flops_lo < mm.pt_ft_flops < mm.pt_ft_flops_hi
    assert mm.ratio_device_s == pytest.approx(2 * math.sqrt(2))  # device-s ladder 10 s x 2^k, mmlg 10 s
    assert eq.loc["mmlg/elastic"].kind == "never" and eq.loc["tleg"].kind == "always"
    comp = pd.read_parquet(rep / "comparisons.parquet")
    # every test is corrected over the whole table: Holm's p is never below Welch's
    assert (comp.p_holm >= comp.p_welch).all() and comp.p_welch.notna().all()
    vs = comp.set_index(["arm", "vs"])
    assert vs.loc[("mmlg", "scratch")].verdict == "mmlg better"
    assert vs.loc[("mmlg", "scratch")]["diff"] == pytest.approx(10.0)
    assert vs.loc[("mmlg/elastic", "tleg")].verdict == "mmlg/elastic better"
    assert ("mmlg/elastic", "mmlg") not in vs.index or ("mmlg", "mmlg/elastic") not in vs.index  # once per pair
    # spend: each stage once per arm; cost to reach a target: only mmlg/elastic reaches 90% of the best (90)
    spend = pd.read_parquet(rep / "spend.parquet").set_index(["arm", "stage"])
    assert spend.loc[("mmlg/elastic", "extraction")].device_s == 30.0 and spend.loc[("pt_ft@2x", "pretrain")].runs == 1
    assert spend.loc[("(ancestor)", "ancestor")].device_s == 100.0
    tg = pd.read_parquet(rep / "cost_to_target.parquet")
    t90 = tg[tg.target == "90% of the best"]
    assert t90.target_score.iloc[0] == pytest.approx(81.0)
    assert t90[t90.reached].arm.tolist() == ["mmlg/elastic"] and t90[t90.cheapest].arm.tolist() == ["mmlg/elastic"]
    from mmlg_ray import cost

    price = cost.money(30 / 3600, "cpu-2core", "on_demand", cost.price_table())  # the default report.device
    assert t90[t90.reached].money_alone.iloc[0] == pytest.approx(price)
    ts = tg[tg.target == "scratch's best"].set_index("arm")
    assert ts.target_score.iloc[0] == pytest.approx(45.0) and not ts.loc["tleg"].reached and ts.loc["mmlg"].surely


def test_constructed_old_results_render_with_a_test_selection_note(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    t = constructed_trials()
    t = t[(t.extraction != "elastic") & ((t.method != "pt_ft") | (t.pt_budget == 1.0))]
    t.drop(columns=["val_score", "best_val_score", "arm", "extraction", "pt_budget"]).to_parquet(out / "trials.parquet")
    constructed_stages().to_parquet(out / "stages.parquet")
    assert report_job.main([str(out)]) == 0
    o = outline(out)
    assert paras(o, "reading")[0] == "selection_test"
    assert "equal_accuracy" in o and paras(o, "fixed_vs_elastic") == ["fixed_vs_elastic_none"]


def test_pretraining_is_shared_by_the_descendants_that_use_it():
    from mmlg_ray.report import normalize, pretrain_share

    rows = [_row("pt_ft", 0, 50.0, 50.0, budget=1.0, arm="pt_ft@1x", pre=8e11, modality=m) for m in ("image", "text")]
    rows += [
        _row("mmlg", 0, 50.0, 50.0, extraction="fixed", modality=m, depth=d) for m in ("image", "text") for d in (1, 2)
    ]
    rows += [_row("mmlg", 0, 50.0, 50.0, extraction="elastic", arm="mmlg/elastic", modality="image")]
    ft = normalize(pd.DataFrame(rows))
    share = pretrain_share(ft, constructed_stages(), "flops")
    # one pre-trained shape serves image and text: half each; the fixed learngene serves 4 cells: a quarter
    # each; the elastic one serves its one cell alone
    assert share.tolist() == pytest.approx([4e11, 4e11] + [2.5e10] * 4 + [3e11])


# --------------------------------------------------------------------------- the report in a browser
PROBE = """<script>
addEventListener("load", () => {
  const imgs = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    return {alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
            x: r.left + scrollX, y: r.top + scrollY, rw: r.width, rh: r.height};
  });
  const p = document.createElement("pre");
  p.id = "probe";
  p.textContent = JSON.stringify({imgs: imgs, height: document.documentElement.scrollHeight});
  document.body.appendChild(p);
});
</script>"""


def _chromium() -> str:
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "chromium is not installed: `make setup` (its `data` target) installs the Debian package "
            "chromium, or run `apt-get install -y chromium`"
        )
    return path


def _headless(*args, timeout=120) -> str:
    import subprocess

    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--virtual-time-budget=10000",
        *args,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_report_renders_in_headless_chromium_with_every_plot_drawn(finished, tmp_path):
    import json
    import re

    import numpy as np
    from PIL import Image

    html = (finished / "report" / "report.html").read_text()
    n_imgs = html.count("<img ")
    assert n_imgs >= 9
    # the report itself, plus a probe script that lists each image as the browser decoded and laid it out
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _headless("--window-size=1280,2000", "--dump-dom", probe.as_uri())
    info = json.loads(__import__("html").unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    assert len(info["imgs"]) == n_imgs
    for im in info["imgs"]:
        assert im["complete"] and im["w"] > 0 and im["h"] > 0 and im["rw"] > 0, im  # decoded and laid out
    # a screenshot of the whole page (the report file itself, no probe): every plot's area is drawn
    shot = tmp_path / "report.png"
    height = int(info["height"])
    _headless(f"--window-size=1280,{height}", f"--screenshot={shot}", (finished / "report" / "report.html").as_uri())
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape[:2] == (height, 1280) and px.std() > 10  # not blank
    for im in info["imgs"]:
        x, y, w, h = (int(round(im[k])) for k in ("x", "y", "rw", "rh"))
        area = px[y : y + h, x : x + w]
        assert area.size, im["alt"]
        ink = (area.min(axis=2) < 200).mean()  # pixels darker than near-white: axes, text, marks
        color = (area.max(axis=2) - area.min(axis=2) > 80).mean()  # saturated pixels: the plotted data
        assert ink > 0.005 and color > 0.0005, (im["alt"], ink, color)


def test_the_report_texts_and_the_code_name_the_same_keys():
    """Every key the report's code asks report_texts.yaml for exists, and every text there is used."""
    import re

    from mmlg_ray.report.texts import texts

    src = "\n".join(p.read_text() for p in (Path(__file__).parents[1] / "mmlg_ray" / "report").glob("*.py"))
    used = set(re.findall(r'\b(?:para|words|title|section)\(\s*"([a-z_]+)"', src))
    used |= set(re.findall(r'group="([a-z_]+)"', src))
    have = set(texts()["paras"]) | set(texts()["sections"])
    assert used - have == set() and have - used == set()
    assert all(set(t) <= {"text", "lead"} for t in texts()["paras"].values())
