"""Analytic cost model: parameter counts and training FLOPs for any CLIP tower spec, at any scale.

Counts follow open_clip's default ViT / text transformer exactly (checked against instantiated
models in tests). FLOPs count a multiply-add as 2; a training step is forward + backward = 3x
forward; attention's sequence-length terms (QK^T and AV) are included.
"""
from __future__ import annotations

import os

from .config import ModelSpec
from .models import towers_of


def layer_params(width: int, mlp_ratio: float, layer_scale: bool = False) -> int:
    d, h = width, int(width * mlp_ratio)  # open_clip's MLP width
    return (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (h * d + h) + (d * h + d) + (2 * d if layer_scale else 0)


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
        flops += 2 * (n - 1) * 3 * spec.patch_size ** 2 * d
    return flops


def forward_flops(spec: ModelSpec, modality: str = "image_text") -> int:
    return sum(tower_forward_flops(spec, t) for t in towers_of(modality))


def train_flops(spec: ModelSpec, modality: str, samples: int) -> int:
    """Forward + backward FLOPs of `samples` training samples."""
    return 3 * forward_flops(spec, modality) * samples


def extraction_flops(aux_spec: ModelSpec, teacher_spec: ModelSpec, samples: int) -> int:
    """Student forward+backward plus the frozen teacher's forward, per the cost accounting."""
    return train_flops(aux_spec, "image_text", samples) + forward_flops(teacher_spec, "image_text") * samples


# --------------------------------------------------------------------------- money
def price_table(report_cfg=None) -> dict:
    """Device -> {on_demand, spot, peak_tflops{dtype}, utilization}; shipped table + overrides."""
    import importlib.resources
    import yaml
    from .errors import UserError
    path = getattr(report_cfg, "prices_file", None)
    fix = "give a YAML file shaped like mmlg_ray/prices.yaml (devices: {name: {on_demand, spot, peak_tflops, ...}})"
    try:
        text = open(os.path.expanduser(path)).read() if path else \
            importlib.resources.files("mmlg_ray").joinpath("prices.yaml").read_text()
        table = (yaml.safe_load(text) or {})["devices"]
        if not isinstance(table, dict):
            raise TypeError
    except OSError as e:
        raise UserError("report.prices_file", f"cannot read {path}: {e.strerror or e}", fix) from None
    except yaml.YAMLError as e:
        raise UserError("report.prices_file", f"{path} is not valid YAML: {str(e).splitlines()[0]}", fix) from None
    except (KeyError, TypeError):
        raise UserError("report.prices_file", f"{path} has no `devices` mapping", fix) from None
    for dev, over in (getattr(report_cfg, "prices", None) or {}).items():
        if not isinstance(over, dict):
            raise UserError(f"report.prices.{dev}", "is not a mapping", "e.g. {on_demand: 1.0, spot: 0.3}")
        table[dev] = {**table.get(dev, {}), **over}
    return table


def device_hours(flops: float, device: str, dtype: str = "fp32", table: dict | None = None) -> float:
    table = table or price_table()
    if device not in table:
        from .errors import UserError
        raise UserError("report.device", f"{device!r} is not in the price table", f"one of {sorted(table)}")
    d = table[device]
    return flops / (d["peak_tflops"][dtype] * 1e12 * d["utilization"]) / 3600


def money(hours: float, device: str, pricing: str = "on_demand", table: dict | None = None) -> float:
    table = table or price_table()
    return hours * table[device][pricing]
