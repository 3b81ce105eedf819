"""Analytic cost model: parameter counts and training FLOPs for any CLIP tower spec, at any scale.

Counts follow open_clip's default ViT / text transformer exactly (checked against instantiated
models in tests). FLOPs count a multiply-add as 2; a training step is forward + backward = 3x
forward; attention's sequence-length terms (QK^T and AV) are included.
"""

from __future__ import annotations

import os

from mmlg_ray.config import ModelSpec
from mmlg_ray.method.models import towers_of


def layer_params(width: int, mlp_ratio: float, layer_scale: bool = False) -> int:
    d, h = width, int(width * mlp_ratio)  # open_clip's MLP width
    return (
        (2 * d)
        + (3 * d * d + 3 * d)
        + (d * d + d)
        + (2 * d)
        + (h * d + h)
        + (d * h + d)
        + (2 * d if layer_scale else 0)
    )


def tokens(spec: ModelSpec, tower: str) -> int:
    if tower == "image":
        return (spec.image_size // spec.patch_size) ** 2 + 1
    return spec.context_length


def tower_params(spec: ModelSpec, tower: str, layers_only: bool = False) -> int:
    d, depth = spec.width(tower), spec.depth(tower)
    body = depth * layer_params(d, spec.mlp_ratio_of(tower), spec.layer_scale(tower) is not None)
    if layers_only:
        return body
    if tower == "image":
        p = spec.patch_size
        return (3 * p * p * d) + d + tokens(spec, "image") * d + 2 * d + body + 2 * d + d * spec.embed_dim
    return spec.vocab_size * d + spec.context_length * d + body + 2 * d + d * spec.embed_dim


def model_params(spec: ModelSpec, modality: str = "image_text") -> int:
    n = sum(tower_params(spec, t) for t in towers_of(modality))
    return n + (1 if modality == "image_text" else 0)  # logit_scale


def tower_forward_flops(spec: ModelSpec, tower: str) -> int:
    """Forward FLOPs of one sample through one tower."""
    d, n, depth = spec.width(tower), tokens(spec, tower), spec.depth(tower)
    h = spec.mlp_hidden(tower)
    per_layer = 2 * n * d * 3 * d + 2 * n * n * d * 2 + 2 * n * d * d + 2 * n * d * h * 2
    flops = depth * per_layer + 2 * d * spec.embed_dim
    if tower == "image":
        flops += 2 * (n - 1) * 3 * spec.patch_size**2 * d
    return flops


def forward_flops(spec: ModelSpec, modality: str = "image_text") -> int:
    return sum(tower_forward_flops(spec, t) for t in towers_of(modality))


def train_flops(spec: ModelSpec, modality: str, samples: int) -> int:
    """Forward + backward FLOPs of `samples` training samples."""
    return 3 * forward_flops(spec, modality) * samples


def extraction_flops(aux_spec: ModelSpec, teacher_spec: ModelSpec, samples: int) -> int:
    """Student forward+backward plus the frozen teacher's forward, per the cost accounting."""
    return train_flops(aux_spec, "image_text", samples) + forward_flops(teacher_spec, "image_text") * samples


# --------------------------------------------------------------------------- the price table
# The dtypes a stage's compute can run in, as the price table names their peaks: fp32 on CUDA cores,
# tf32 (fp32 matmuls on tensor cores: precision=fp32 with tf32=true on a GPU), bf16, fp16.
PEAK_DTYPES = ("fp32", "tf32", "bf16", "fp16")


def _price_models():
    """The price table's schema (pydantic; built on first use so importing cost stays light)."""
    from typing import Literal, Optional

    from pydantic import BaseModel, ConfigDict, Field

    class _S(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Head(_S):
        instance: str = Field(min_length=1)
        on_demand: float = Field(gt=0)
        price_source: str = Field(min_length=1)
        price_date: str = Field(min_length=1)

    class Device(_S):
        instance: str = Field(min_length=1)
        gpus_per_instance: int = Field(1, ge=1)
        on_demand: float = Field(gt=0, description="USD per device-hour")
        spot: Optional[float] = Field(None, gt=0)
        price_source: str = Field(min_length=1)
        price_date: str = Field(min_length=1)
        spot_source: Optional[str] = None
        compute_capability: Optional[float] = Field(None, gt=0)
        peak_tflops: dict[Literal["fp32", "tf32", "bf16", "fp16"], float]
        peak_source: str = Field(min_length=1)
        utilization: float = Field(gt=0, le=1)

    class Table(_S):
        provider: str = Field(min_length=1)
        region: str = Field(min_length=1)
        currency: Literal["USD"] = "USD"
        checked: str = Field(min_length=1)
        head: Optional[Head] = None
        devices: dict[str, Device] = Field(min_length=1)

    return Table


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate_table(raw, where: str, fix: str):
    """The validated table, or a UserError naming the first bad field as `where`.path."""
    from pydantic import ValidationError

    from mmlg_ray.errors import UserError

    try:
        t = _price_models().model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise UserError(f"{where}.{loc}" if loc else where, err["msg"], fix) from None
    for name, d in t.devices.items():
        for dt, v in d.peak_tflops.items():
            if not v > 0:
                raise UserError(f"{where}.devices.{name}.peak_tflops.{dt}", f"{v} is not a positive TFLOP/s", fix)
        if "fp32" not in d.peak_tflops:
            raise UserError(f"{where}.devices.{name}.peak_tflops.fp32", "is missing (every device runs fp32)", fix)
        cc = d.compute_capability
        if cc is not None and cc < 8.0:  # before Ampere: no bf16, no TF32 tensor cores
            for dt in ("bf16", "tf32"):
                if dt in d.peak_tflops:
                    raise UserError(
                        f"{where}.devices.{name}.peak_tflops.{dt}",
                        f"compute capability {cc} has no {dt} units",
                        f"remove the {dt} entry",
                    )
    return t


def load_prices(report_cfg=None):
    """The price table (validated): the shipped mmlg_ray/prices.yaml or report.prices_file, with
    report.prices merged over it deeply. A bad table is one UserError naming the field."""
    import importlib.resources

    import yaml

    from mmlg_ray.errors import UserError

    path = getattr(report_cfg, "prices_file", None)
    where = "report.prices_file" if path else "mmlg_ray/prices.yaml"
    fix = (
        "give a YAML file shaped like mmlg_ray/prices.yaml (provider, region, checked, devices: "
        "{name: {instance, on_demand, price_source, price_date, peak_tflops, peak_source, utilization}})"
    )
    try:
        text = (
            open(os.path.expanduser(path)).read()
            if path
            else importlib.resources.files("mmlg_ray").joinpath("prices.yaml").read_text()
        )
        raw = yaml.safe_load(text)
    except OSError as e:
        raise UserError("report.prices_file", f"cannot read {path}: {e.strerror or e}", fix) from None
    except yaml.YAMLError as e:
        raise UserError("report.prices_file", f"{path} is not valid YAML: {str(e).splitlines()[0]}", fix) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("devices"), dict):
        raise UserError(where, f"{path or 'the table'} has no `devices` mapping", fix)
    over = getattr(report_cfg, "prices", None) or {}
    if over:
        _validate_table(raw, where, fix)  # the file's own faults are named as the file's
        for dev, o in over.items():
            if not isinstance(o, dict):
                raise UserError(f"report.prices.{dev}", "is not a mapping", "e.g. {on_demand: 1.0, spot: 0.3}")
        merged = _deep_merge(
            raw,
            {
                "devices": {d: o for d, o in over.items() if d != "head"},
                **({"head": over["head"]} if "head" in over else {}),
            },
        )
        for dev, o in over.items():  # a new device must be given whole; an existing one keeps what is not overridden
            if dev != "head" and dev not in raw["devices"]:
                merged["devices"][dev] = o
        return _validate_table(
            merged,
            "report.prices",
            "override only fields of mmlg_ray/prices.yaml's schema, " "e.g. report.prices={a10g: {spot: 0.5}}",
        )
    return _validate_table(raw, where, fix)


def price_table(report_cfg=None) -> dict:
    """Device -> {on_demand, spot, peak_tflops{dtype}, utilization, instance, sources...}: the
    validated table (load_prices) as plain dicts."""
    return {k: v.model_dump() for k, v in load_prices(report_cfg).devices.items()}


def run_dtype(precision: str, tf32: bool = False, on_gpu: bool = True) -> str:
    """The dtype a stage's matmuls run in, as the price table names its peaks: bf16 / fp16 autocast
    (or DeepSpeed's bf16 / fp16) run in that dtype; fp32 runs on TF32 tensor cores when tf32 is on
    and the stage runs on a GPU (precision.set_tf32), on fp32 units otherwise."""
    if precision in ("bf16", "fp16"):
        return precision
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}")
    return "tf32" if tf32 and on_gpu else "fp32"


def stage_dtypes(cfg, device: str | None = None, table: dict | None = None) -> dict[str, str]:
    """Each stage's compute dtype in a run of `cfg` on the priced `device` (report.device). Every
    training and evaluation stage of this platform follows the top-level `precision` (precision.py:
    TorchEngine autocast, DeepSpeed's bf16/fp16 for the extraction, the frozen teacher cast to the
    student's dtype); `tf32` applies to fp32 stages on a GPU. A device without a TF32 peak (a CPU,
    a T4) runs fp32 at its fp32 peak."""
    table = table or price_table(cfg.report)
    device = device or cfg.report.device
    peaks = (table.get(device) or {}).get("peak_tflops") or {}
    on_gpu = cfg.device != "cpu" and "tf32" in peaks
    dt = run_dtype(cfg.precision, cfg.tf32, on_gpu)
    return {s: dt for s in ("ancestor", "extraction", "pretrain", "finetune", "evaluation")}


def _entry(device: str, table: dict) -> dict:
    if device not in table:
        from mmlg_ray.errors import UserError

        raise UserError("report.device", f"{device!r} is not in the price table", f"one of {sorted(table)}")
    return table[device]


def peak_flops(device: str, dtype: str, table: dict | None = None) -> float:
    """Peak FLOP/s of `device` in `dtype`; a dtype the device cannot run is an error naming it."""
    table = table or price_table()
    d = _entry(device, table)
    if dtype not in d["peak_tflops"]:
        from mmlg_ray.errors import UserError

        raise UserError(
            "precision",
            f"{device} has no {dtype} peak in the price table (it cannot run {dtype})",
            f"use a precision it runs ({', '.join(sorted(d['peak_tflops']))}) or another report.device",
        )
    return d["peak_tflops"][dtype] * 1e12


def device_hours(
    flops: float, device: str, dtype: str = "fp32", table: dict | None = None, utilization: float | None = None
) -> float:
    """Device-hours for `flops` in `dtype` at the table's (or the given, e.g. calibrated) utilisation."""
    table = table or price_table()
    u = utilization if utilization is not None else _entry(device, table)["utilization"]
    return flops / (peak_flops(device, dtype, table) * u) / 3600


def money(hours: float, device: str, pricing: str = "on_demand", table: dict | None = None) -> float:
    table = table or price_table()
    price = _entry(device, table).get(pricing)
    if price is None:
        from mmlg_ray.errors import UserError

        raise UserError("report.pricing", f"the price table has no {pricing} price for {device}", "use on_demand")
    return hours * price


# --------------------------------------------------------------------------- cost per method
# Who pays for what (DESIGN section 3). A stage's cost is counted ONCE, for the arm that uses it:
#   extraction "mmlg" (or "mmlg/elastic")  -> that learngene arm, shared by all its cells and trials;
#   pretrain "pt_ft/<shape>@<b>x"          -> arm pt_ft@<b>x; one pre-trained shape serves that arm's
#                                             image, text and image_text descendants of the shape;
#   pretrain "csm/<shape>@1x"              -> arm csm, likewise;
#   fine-tuning                            -> the trial's arm (every trial counted: search + seeds).
# The ancestor is shown separately and counted by ANCESTOR_RULE:
#   "sunk"   (default) excluded from every method: it exists before the study (open_clip weights, or
#            a cached local pre-training) and every method compared reads the same one;
#   "charge" split equally among the arms that read it (all but scratch and pt_ft), e.g. to price a
#            study that must pre-train its own ancestor.
ANCESTOR_RULES = ("sunk", "charge")
ANCESTOR_FREE = ("scratch", "pt_ft")  # arms (by method) that never read the ancestor


def stage_arm(stage: str, name: str) -> str | None:
    """The arm (as trials.parquet's `arm` names it) a stages.parquet row serves; None for the ancestor."""
    name = str(name)
    if stage == "extraction":
        return name
    if stage == "pretrain":
        method, _, rest = name.partition("/")
        budget = float(rest.rsplit("@", 1)[1].rstrip("x")) if "@" in rest else 1.0
        return f"pt_ft@{budget:g}x" if method == "pt_ft" else method
    return None


def _arm_of(t) -> "object":
    """trials' arm column (older tables: rebuilt from method / extraction / pt_budget)."""
    if "arm" in t:
        return t["arm"].astype(str)
    ext = t["extraction"].fillna("").astype(str) if "extraction" in t else [""] * len(t)
    bud = t["pt_budget"].astype(float) if "pt_budget" in t else [1.0] * len(t)
    return [
        f"{m}/{e}" if m in ("mmlg", "tleg") and e == "elastic" else f"pt_ft@{b:g}x" if m == "pt_ft" else m
        for m, e, b in zip(t["method"], ext, bud)
    ]


def _precisions(stages, default: str) -> list[str]:
    """Each stages row's recorded precision; `default` (the run's) where none was recorded."""
    if "precision" not in stages:
        return [default] * len(stages)
    return [p if p in ("fp32", "bf16", "fp16") else default for p in stages["precision"]]


def method_costs(
    trials,
    stages,
    *,
    device: str,
    pricing: str = "on_demand",
    table: dict | None = None,
    precision: str = "fp32",
    tf32: bool = False,
    ancestor: str = "sunk",
):
    """Per arm: the stages it uses, each counted once, plus all its trials' fine-tuning; the
    ancestor as its own row, counted by `ancestor` (ANCESTOR_RULES). Returns a DataFrame, one row
    per arm (sorted) and a last row "ancestor", with
      n_trials, n_cells, shared_stages, shared_flops, shared_device_s, finetune_flops,
      finetune_device_s, ancestor_flops, ancestor_device_s, total_flops, total_device_s,
      device_hours (measured device-seconds / 3600), money (at `pricing`),
      device_hours_analytic, money_analytic (the FLOPs at the dtype each stage ran in: a stages row's
      `precision` column when present, else `precision`; at the table's utilisation),
      counted (False for a sunk ancestor row).
    The arms' totals plus a counted ancestor add up to every stage and trial exactly once.
    trials: trials.parquet rows (arm or method/extraction/pt_budget; modality, depth, width;
    finetune_flops, finetune_device_s). stages: stages.parquet rows (stage, name, flops, device_s)."""
    import pandas as pd

    if ancestor not in ANCESTOR_RULES:
        raise ValueError(f"ancestor rule {ancestor!r}: one of {ANCESTOR_RULES}")
    table = table or price_table()
    on_gpu = "tf32" in _entry(device, table)["peak_tflops"]
    t = trials.copy()
    t["_arm"] = list(_arm_of(t)) if len(t) else []
    s = stages.copy()
    for c in ("flops", "device_s"):
        s[c] = s[c].astype(float).fillna(0.0) if c in s else 0.0
    s["_arm"] = [stage_arm(a, b) for a, b in zip(s["stage"], s["name"])] if len(s) else []
    prec = _precisions(s, precision)
    s["_hours"] = [device_hours(f, device, run_dtype(p, tf32, on_gpu), table) for f, p in zip(s.flops, prec)]
    ft_dtype = run_dtype(precision, tf32, on_gpu)
    anc = s[s._arm.isna()]
    arms = sorted(set(t["_arm"]) | set(s._arm.dropna()))
    readers = [a for a in arms if a.split("@")[0].split("/")[0] not in ANCESTOR_FREE]
    rows = []
    for a in arms:
        mine, st = t[t._arm == a], s[s._arm == a]
        cells = mine[[c for c in ("modality", "depth", "width") if c in mine]].drop_duplicates()
        share = 1 / len(readers) if ancestor == "charge" and a in readers else 0.0
        ff = float(mine["finetune_flops"].astype(float).sum()) if "finetune_flops" in mine else 0.0
        fd = float(mine["finetune_device_s"].astype(float).sum()) if "finetune_device_s" in mine else 0.0
        r = {
            "method": a,
            "n_trials": len(mine),
            "n_cells": len(cells),
            "shared_stages": len(st),
            "shared_flops": float(st.flops.sum()),
            "shared_device_s": float(st.device_s.sum()),
            "finetune_flops": ff,
            "finetune_device_s": fd,
            "ancestor_flops": share * float(anc.flops.sum()),
            "ancestor_device_s": share * float(anc.device_s.sum()),
            "_ah": float(st._hours.sum()) + device_hours(ff, device, ft_dtype, table) + share * float(anc._hours.sum()),
            "counted": True,
        }
        rows.append(r)
    rows.append(
        {
            "method": "ancestor",
            "n_trials": 0,
            "n_cells": 0,
            "shared_stages": len(anc),
            "shared_flops": float(anc.flops.sum()),
            "shared_device_s": float(anc.device_s.sum()),
            "finetune_flops": 0.0,
            "finetune_device_s": 0.0,
            "ancestor_flops": 0.0,
            "ancestor_device_s": 0.0,
            "_ah": float(anc._hours.sum()),
            "counted": False,
        }
    )
    df = pd.DataFrame(rows)
    df["total_flops"] = df.shared_flops + df.finetune_flops + df.ancestor_flops
    df["total_device_s"] = df.shared_device_s + df.finetune_device_s + df.ancestor_device_s
    df["device_hours"] = df.total_device_s / 3600
    df["money"] = [money(h, device, pricing, table) for h in df.device_hours]
    df["device_hours_analytic"] = df.pop("_ah")
    df["money_analytic"] = [money(h, device, pricing, table) for h in df.device_hours_analytic]
    return df


def stage_costs(
    stages,
    *,
    device: str,
    pricing: str = "on_demand",
    table: dict | None = None,
    precision: str = "fp32",
    tf32: bool = False,
):
    """stages.parquet with the arm each row serves (None: the ancestor), its compute dtype, measured
    device-hours and money, and analytic device-hours and money at that dtype."""
    table = table or price_table()
    on_gpu = "tf32" in _entry(device, table)["peak_tflops"]
    s = stages.copy()
    prec = _precisions(s, precision)
    s["arm"] = [stage_arm(a, b) for a, b in zip(s["stage"], s["name"])]
    s["dtype"] = [run_dtype(p, tf32, on_gpu) for p in prec]
    dev_s = s["device_s"].astype(float).fillna(0.0) if "device_s" in s else 0.0 * s.index
    s["device_hours"] = dev_s / 3600
    s["money"] = [money(h, device, pricing, table) for h in s.device_hours]
    s["device_hours_analytic"] = [device_hours(float(f or 0), device, d, table) for f, d in zip(s.flops, s.dtype)]
    s["money_analytic"] = [money(h, device, pricing, table) for h in s.device_hours_analytic]
    return s


# --------------------------------------------------------------------------- calibration
def counted_flops(fn) -> int:
    """FLOPs torch actually dispatches in one call of fn() (torch.utils.flop_counter: matmuls,
    convolutions and attention; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def time_step(fn, *, warmup: int = 2, repeats: int = 5, sync=None) -> dict:
    """Seconds per call of fn() after `warmup` calls: median and spread (min, max) over `repeats`.
    sync: called after each call (e.g. torch.cuda.synchronize) so GPU time is counted."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    if sync:
        sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}


def calibrate_utilization(
    flops_per_step: float, seconds_per_step: float, device: str, dtype: str, table: dict | None = None
) -> dict:
    """Achieved FLOP/s of a measured step and the utilisation it implies against the table's peak of
    (device, dtype): the number to put in the table (or report.prices) for that device. Honest only
    if the step was measured on that device in that dtype, at the model size the plan prices."""
    achieved = flops_per_step / seconds_per_step
    peak = peak_flops(device, dtype, table)
    return {"achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "utilization": achieved / peak}


def measure_training_step(
    spec: ModelSpec, batch: int = 8, precision: str = "fp32", device: str = "cpu", warmup: int = 2, repeats: int = 5
) -> dict:
    """One CLIP training step (forward, contrastive loss, backward, AdamW) of `spec` on random data,
    timed (time_step) and counted twice: the analytic model's train_flops and torch's flop counter.
    Returns both counts, the timing, and achieved FLOP/s by the analytic count."""
    import torch

    from mmlg_ray.method import precision as amp
    from mmlg_ray.method.models import build_model
    from mmlg_ray.method.train import adamw, clip_loss

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(spec, "image_text").to(dev).train()
    opt = adamw(list(model.parameters()), 1e-4, dev)
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, device=dev)
    t = torch.randint(1, spec.vocab_size - 1, (batch, spec.context_length), device=dev)

    def step():
        with amp.autocast(dev, precision):
            img, txt, scale = model(x, t)
        clip_loss(img.float(), txt.float(), scale.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counted = counted_flops(step)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    tm = time_step(step, warmup=warmup, repeats=repeats, sync=sync)
    analytic = train_flops(spec, "image_text", batch)
    return {
        "batch": batch,
        "precision": precision,
        "device": device,
        "analytic_flops": analytic,
        "counted_flops": counted,
        **tm,
        "achieved_flops_per_s": analytic / tm["median_s"],
    }
