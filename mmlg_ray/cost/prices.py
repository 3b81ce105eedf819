"""The price table (mmlg_ray/prices.yaml or the user's), devices' peak FLOP/s by dtype, device-hours and money."""

from __future__ import annotations

import os


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
