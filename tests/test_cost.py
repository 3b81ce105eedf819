import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmlg_ray import cost
from mmlg_ray.config import ModelSpec
from mmlg_ray.method.models import build_model

SPECS = [
    ModelSpec(
        image_depth=2,
        text_depth=3,
        image_width=128,
        text_width=64,
        embed_dim=32,
        image_size=16,
        patch_size=8,
        context_length=16,
    ),
    ModelSpec(),  # the local ancestor
    ModelSpec(
        image_depth=1,
        text_depth=1,
        image_width=192,
        text_width=128,
        mlp_ratio=2.0,
        embed_dim=48,
        image_size=32,
        patch_size=4,
        context_length=20,
        vocab_size=1000,
    ),
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("modality", ["image", "text", "image_text"])
def test_param_count_matches_open_clip_exactly(spec, modality):
    model = build_model(spec, modality)
    assert cost.model_params(spec, modality) == sum(p.numel() for p in model.parameters())


def test_paper_scale_param_count():
    from mmlg_ray.method.models import spec_from_arch as _spec_for_arch
    import open_clip

    spec = _spec_for_arch("ViT-B-16")
    model = open_clip.create_model("ViT-B-16")  # architecture only, no weights
    assert cost.model_params(spec) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", SPECS)
def test_training_flops_against_torch_flop_counter(spec):
    """Measured by torch.utils.flop_counter with attention on SDPA's math path (so QK^T and AV
    are counted as bmm): forward matches exactly; forward+backward within 5% of 3x forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model(spec).train()
    x = torch.randn(2, 3, spec.image_size, spec.image_size)
    t = torch.randint(1, 999, (2, spec.context_length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        img, txt, _ = model(x, t)
    assert fc.get_total_flops() / 2 == cost.forward_flops(spec)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        img, txt, _ = model(x, t)
        (img.sum() + txt.sum()).backward()
    measured = fc.get_total_flops()
    predicted = cost.train_flops(spec, "image_text", 2)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


# --------------------------------------------------------------------------- pricing and cost sharing
import math  # noqa: E402

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from mmlg_ray.config import load_config  # noqa: E402
from mmlg_ray.errors import UserError  # noqa: E402

TABLE = {
    "dev": {
        "on_demand": 3.6,
        "spot": 1.8,
        "utilization": 0.5,
        "peak_tflops": {"fp32": 10.0, "tf32": 20.0, "bf16": 40.0},
    }
}


def constructed_sweep():
    """An ancestor, one mmlg extraction, pt_ft pre-training of 2 shapes at 1x, csm of the same 2
    shapes; trials of mmlg, pt_ft@1x and scratch on 3 modalities x 2 shapes x 2 seeds."""
    stages = pd.DataFrame(
        [
            {"stage": "ancestor", "name": "local", "flops": 1000.0, "device_s": 100.0},
            {"stage": "extraction", "name": "mmlg", "flops": 600.0, "device_s": 60.0},
            {"stage": "pretrain", "name": "pt_ft/i2x64-t2x64@1x", "flops": 300.0, "device_s": 30.0},
            {"stage": "pretrain", "name": "pt_ft/i4x64-t4x64@1x", "flops": 500.0, "device_s": 50.0},
            {"stage": "pretrain", "name": "csm/i2x64-t2x64@1x", "flops": 350.0, "device_s": 35.0},
            {"stage": "pretrain", "name": "csm/i4x64-t4x64@1x", "flops": 350.0, "device_s": 35.0},
        ]
    )
    trials = pd.DataFrame(
        [
            {
                "arm": arm,
                "method": arm.split("@")[0],
                "modality": mod,
                "depth": d,
                "width": 64,
                "seed": s,
                "finetune_flops": 10.0,
                "finetune_device_s": 1.0,
            }
            for arm in ("mmlg", "pt_ft@1x", "scratch")
            for mod in ("image", "text", "image_text")
            for d in (2, 4)
            for s in (0, 1)
        ]
    )
    return trials, stages


def test_method_costs_count_each_shared_stage_once():
    trials, stages = constructed_sweep()
    mc = cost.method_costs(trials, stages, device="dev", table=TABLE).set_index("method")
    # one pre-training per shape, shared by the shape's image, text and image_text descendants
    assert mc.loc["pt_ft@1x", "total_flops"] == 300 + 500 + 12 * 10
    assert mc.loc["pt_ft@1x", "shared_stages"] == 2 and mc.loc["pt_ft@1x", "n_cells"] == 6
    assert mc.loc["mmlg", "total_flops"] == 600 + 12 * 10  # one extraction for all 6 cells
    assert mc.loc["scratch", "total_flops"] == 12 * 10
    assert mc.loc["csm", "total_flops"] == 700 and mc.loc["csm", "n_trials"] == 0  # a stage without trials is kept
    # sunk ancestor: its own row, in no method
    assert not mc.loc["ancestor", "counted"] and mc.loc["ancestor", "total_flops"] == 1000
    assert (mc.drop("ancestor").ancestor_flops == 0).all()
    # every stage and trial exactly once
    assert (
        mc[mc.counted].total_device_s.sum() + mc.loc["ancestor", "total_device_s"]
        == stages.device_s.sum() + trials.finetune_device_s.sum()
    )
    # measured money: device-seconds / 3600 x price
    assert math.isclose(mc.loc["pt_ft@1x", "money"], (30 + 50 + 12) / 3600 * 3.6)
    # work thrown away by restarts (a trial's, a pre-training's) was paid for: it is in the device-seconds
    lost_t = trials.assign(lost_device_s=[7.0] + [0.0] * (len(trials) - 1))  # an mmlg trial
    lost_s = stages.assign(lost_device_s=[0.0, 0.0, 4.0, 0.0, 0.0, 0.0])  # pt_ft's first shape
    ml = cost.method_costs(lost_t, lost_s, device="dev", table=TABLE).set_index("method")
    assert ml.loc["mmlg", "total_device_s"] == mc.loc["mmlg", "total_device_s"] + 7
    assert ml.loc["pt_ft@1x", "total_device_s"] == mc.loc["pt_ft@1x", "total_device_s"] + 4
    assert ml.loc["scratch", "total_device_s"] == mc.loc["scratch", "total_device_s"]
    # charge: the ancestor split equally among the arms that read it (mmlg, csm; not pt_ft, scratch)
    ch = cost.method_costs(trials, stages, device="dev", table=TABLE, ancestor="charge").set_index("method")
    assert ch.loc["mmlg", "ancestor_flops"] == ch.loc["csm", "ancestor_flops"] == 500
    assert ch.loc["pt_ft@1x", "ancestor_flops"] == ch.loc["scratch", "ancestor_flops"] == 0
    assert ch[ch.counted].total_flops.sum() == stages.flops.sum() + trials.finetune_flops.sum()


def test_method_costs_price_each_stage_at_its_precision():
    _, stages = constructed_sweep()
    stages["precision"] = ["fp32", "fp32", "bf16", "bf16", "fp32", "fp32"]
    sc = cost.stage_costs(stages, device="dev", table=TABLE).set_index("name")
    assert sc.loc["mmlg", "dtype"] == "fp32" and sc.loc["pt_ft/i2x64-t2x64@1x", "dtype"] == "bf16"
    assert math.isclose(sc.loc["mmlg", "device_hours_analytic"], 600 / (10e12 * 0.5) / 3600)
    assert math.isclose(sc.loc["pt_ft/i2x64-t2x64@1x", "device_hours_analytic"], 300 / (40e12 * 0.5) / 3600)
    # fp32 with TF32 on a device that has TF32 units: the tf32 peak
    assert (
        cost.stage_costs(stages, device="dev", table=TABLE, tf32=True).set_index("name").loc["mmlg", "dtype"] == "tf32"
    )


def plan_of(*sets):
    from mmlg_ray.engine.plan import make_plan

    return make_plan(load_config("configs/paper_vitb16.yaml", list(sets)))


def test_plan_prices_each_stage_at_the_precision_it_runs_in():
    t = cost.price_table()
    bf = plan_of("precision=bf16")
    ext = next(s for s in bf.stages if s["stage"] == "extraction")
    assert ext["dtype"] == "bf16"
    assert math.isclose(
        ext["device_hours"], ext["flops"] / (t["a10g"]["peak_tflops"]["bf16"] * 1e12 * t["a10g"]["utilization"]) / 3600
    )
    fp = plan_of("precision=fp32", "tf32=false")
    ext32 = next(s for s in fp.stages if s["stage"] == "extraction")
    assert ext32["dtype"] == "fp32"
    assert math.isclose(
        ext32["device_hours"] / ext["device_hours"], t["a10g"]["peak_tflops"]["bf16"] / t["a10g"]["peak_tflops"]["fp32"]
    )
    assert next(s for s in plan_of("precision=fp32").stages if s["stage"] == "pretrain")["dtype"] == "tf32"
    # the total is the sum of the stages' and trials' hours, each at its own dtype
    assert fp.device_hours > bf.device_hours
    # a device without bf16 cannot price a bf16 run
    with pytest.raises(UserError, match="precision.*t4 has no bf16"):
        plan_of("precision=bf16", "report.device=t4")


def test_plan_shares_pretraining_per_shape_and_states_assumptions():
    p = plan_of()
    n_shapes = 4 * 3
    assert sum(s["name"].startswith("pt_ft/") for s in p.stages) == n_shapes  # not x3 modalities
    m = {r["method"]: r for r in p.methods}
    assert m["pt_ft@1x"]["shared_stages"] == n_shapes and m["mmlg"]["shared_stages"] == 1
    counted = sum(r["total_flops"] for r in p.methods if r["counted"])
    assert math.isclose(counted, p.total_flops)  # open_clip ancestor: nothing of it run, nothing priced
    text = " ".join(p.assumptions)
    for needle in ("backend=ray", "ASHA upper bound", "evaluation excluded", "report.ancestor=sunk", "us-west-2"):
        assert needle in text
    from mmlg_ray.engine.plan import make_plan

    local = make_plan(load_config("configs/paper_vitb16.yaml"), backend="local")
    assert local.n_trials == p.n_trials == len(p.descendants) * 6  # the same search on both backends
    assert local.head_hours == 0 and p.head_hours > 0 and "no head node" in local.assumptions[0]


# --------------------------------------------------------------------------- the price table
def test_shipped_price_table_is_sourced_and_matches_cluster_yaml():
    t = cost.load_prices()
    assert (t.provider, t.region) == ("aws", "us-west-2")
    cluster = yaml.safe_load(open("cluster.yaml"))
    assert cluster["provider"]["region"] == t.region
    launched = {n["node_config"]["InstanceType"] for n in cluster["available_node_types"].values()}
    assert t.head.instance in launched and t.devices["a10g"].instance in launched
    for name, d in t.devices.items():
        assert d.price_source and d.price_date and d.peak_source
        assert "fp32" in d.peak_tflops
    assert "bf16" not in t.devices["t4"].peak_tflops and "tf32" not in t.devices["t4"].peak_tflops


def _table_file(tmp_path, mutate):
    raw = yaml.safe_load(open("mmlg_ray/prices.yaml"))
    mutate(raw)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    "mutate,field",
    [
        (
            lambda r: r["devices"]["t4"]["peak_tflops"].update(bf16=65.0),
            "report.prices_file.devices.t4.peak_tflops.bf16",
        ),
        (lambda r: r["devices"]["a10g"].pop("price_source"), "report.prices_file.devices.a10g.price_source"),
        (lambda r: r["devices"]["l4"].update(utilization=1.5), "report.prices_file.devices.l4.utilization"),
        (
            lambda r: r["devices"]["h100"]["peak_tflops"].update(fp8=2000),
            "report.prices_file.devices.h100.peak_tflops.fp8",
        ),
        (lambda r: r["devices"]["a10g"]["peak_tflops"].pop("fp32"), "report.prices_file.devices.a10g.peak_tflops.fp32"),
    ],
)
def test_bad_price_table_is_one_line_naming_the_field(tmp_path, mutate, field, capsys):
    path = _table_file(tmp_path, mutate)
    with pytest.raises(UserError) as e:
        cost.load_prices(load_config("configs/local.yaml", [f"report.prices_file={path}"]).report)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)
    from jobs import sweep as sweep_job

    assert sweep_job.main(["--config", "configs/local.yaml", "--set", f"report.prices_file={path}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err


def test_price_overrides_merge_deeply():
    cfg = load_config("configs/local.yaml", ["report.prices={a10g: {peak_tflops: {bf16: 60}}, head: {on_demand: 1}}"])
    t = cost.load_prices(cfg.report)
    shipped = cost.load_prices()
    assert t.devices["a10g"].peak_tflops["bf16"] == 60
    assert t.devices["a10g"].peak_tflops["fp32"] == shipped.devices["a10g"].peak_tflops["fp32"]
    assert t.devices["a10g"].on_demand == shipped.devices["a10g"].on_demand
    assert t.head.on_demand == 1 and t.head.instance == shipped.head.instance
    bad = load_config("configs/local.yaml", ["report.prices={a10g: {peak_tflops: {bf16: -1}}}"])
    with pytest.raises(UserError, match=r"^report\.prices\.devices\.a10g\.peak_tflops\.bf16"):
        cost.load_prices(bad.report)


def test_calibration_measures_a_real_step():
    spec = SPECS[0]
    m = cost.measure_training_step(spec, batch=4, warmup=1, repeats=3)
    assert m["analytic_flops"] == cost.train_flops(spec, "image_text", 4)
    assert m["counted_flops"] > 0 and m["min_s"] <= m["median_s"] <= m["max_s"]
    c = cost.calibrate_utilization(m["analytic_flops"], m["median_s"], "cpu-2core", "fp32")
    assert math.isclose(c["utilization"], m["achieved_flops_per_s"] / 0.2e12)


def test_the_spend_charges_the_work_restarts_threw_away():
    """A restarted trial or pre-training paid for the work it lost (from its last checkpoint to the
    loss): the spend's measured device-hours include it, and say how much of them it is."""
    from mmlg_ray.config import load_config
    from mmlg_ray.report.spend import spend_table

    trials, stages = constructed_sweep()
    trials = trials.assign(extraction="fixed", pt_budget=[1.0 if a == "pt_ft@1x" else float("nan") for a in trials.arm])
    cfg = load_config(None, ["report.device=dev"])
    base = spend_table(trials, stages, cfg, TABLE).set_index(["arm", "stage"])
    lost_t = trials.assign(lost_device_s=[7.0 if a == "mmlg" else 0.0 for a in trials.arm])
    lost_s = stages.assign(lost_device_s=[0.0, 0.0, 4.0, 0.0, 0.0, 0.0])  # pt_ft's first shape
    sp = spend_table(lost_t, lost_s, cfg, TABLE).set_index(["arm", "stage"])
    assert sp.loc[("mmlg", "finetune"), "device_s"] == base.loc[("mmlg", "finetune"), "device_s"] + 12 * 7
    assert sp.loc[("mmlg", "finetune"), "lost_device_s"] == 12 * 7
    assert sp.loc[("pt_ft@1x", "pretrain"), "device_s"] == base.loc[("pt_ft@1x", "pretrain"), "device_s"] + 4
    assert sp.loc[("pt_ft@1x", "pretrain"), "lost_device_s"] == 4
    assert math.isclose(sp.loc[("pt_ft@1x", "pretrain"), "money"], (30 + 50 + 4) / 3600 * 3.6)
    assert (sp.drop([("mmlg", "finetune"), ("pt_ft@1x", "pretrain")]).lost_device_s == 0).all()
    assert (sp.plan_device_h == base.plan_device_h).all()  # the FLOPs model knows nothing of restarts
