"""The whole config (`Config`) and the report's settings."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from mmlg_ray.method.spec import ConfigError, _Strict
from mmlg_ray.config.base import AncestorConfig, Seed, dig
from mmlg_ray.config.datasets import DataConfig
from mmlg_ray.config.stages import DescendantsConfig, LearngeneConfig, drop_defaults_added_later
from mmlg_ray.config.cluster import RayConfig


class ReportConfig(_Strict):
    device: str = Field("cpu-2core", description="device type for predicted device-hours and money")
    pricing: Literal["on_demand", "spot"] = "on_demand"
    prices_file: Optional[str] = Field(None, description="YAML price table replacing mmlg_ray/prices.yaml")
    prices: dict = Field(
        default_factory=dict,
        description="overrides merged deeply over the table, "
        "e.g. {a10g: {peak_tflops: {bf16: 60}}} keeps a10g's other peaks",
    )
    ancestor: Literal["sunk", "charge"] = Field(
        "sunk",
        description="the ancestor's cost: sunk (shown apart, excluded from every method) or charge "
        "(split equally among the methods that read it)",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "dtype" in data:  # earlier runs' config.yaml carry it: read, never fail
            import warnings

            data = {k: v for k, v in data.items() if k != "dtype"}
            warnings.warn(
                "report.dtype is ignored: each stage is priced at the precision it runs in (the "
                "top-level `precision`, and `tf32` for fp32 on a GPU); remove it",
                stacklevel=2,
            )
        return data


URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")  # pyarrow.fs opens these


class Config(_Strict):
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="every training and evaluation stage: fp32, bf16 (autocast; DeepSpeed bf16), or fp16 "
        "with dynamic loss scaling for GPUs without bf16; master weights and artifacts stay fp32",
    )
    tf32: bool = Field(True, description="TF32 tensor cores for fp32 matmuls and convolutions (CUDA only)")
    cache_dir: str = "~/.cache/mmlg_ray"
    output_dir: str = Field("runs/local", description="results folder, or a URI such as s3://bucket/run")
    threads: Optional[int] = Field(None, ge=1)
    ancestor: AncestorConfig = AncestorConfig()
    data: DataConfig = DataConfig()
    learngene: LearngeneConfig = LearngeneConfig()
    descendants: DescendantsConfig = DescendantsConfig()
    ray: RayConfig = RayConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _check(self):
        for name in ("output_dir", "cache_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(
                    name,
                    "is empty",
                    "give a folder, e.g. runs/local"
                    if name == "output_dir"
                    else "give a folder, e.g. ~/.cache/mmlg_ray",
                )
        scheme = self.output_dir.split("://", 1)[0] if "://" in self.output_dir else None
        if scheme is not None and scheme not in URI_SCHEMES:
            raise ConfigError(
                "output_dir",
                f"{scheme}:// is not a supported store",
                "use a local folder or one of " + ", ".join(f"{s}://" for s in URI_SCHEMES),
            )
        spec = self.ancestor.spec
        widest = max(spec.image_width, spec.text_width)
        for w in self.descendants.grid.width:
            if w % spec.head_width:
                raise ConfigError(
                    "descendants.grid.width",
                    f"{w} is not whole heads of the ancestor (image head width {spec.head_width})",
                    f"use a multiple of {spec.head_width} up to {widest}",
                )
            if w > widest:
                raise ConfigError(
                    "descendants.grid.width",
                    f"{w} is wider than the ancestor ({widest}); " "learngene descendants select, never grow",
                    f"use widths up to {widest}",
                )
        return self

    def fingerprint(self, *sections: str) -> str:
        """Short stable hash of some config sections: cache keys for stages. A listed `precision`
        enters the key only when it is not fp32, so fp32 artifacts cached before the setting
        existed keep their keys."""
        data = self.model_dump(mode="json")
        for ds in (data.get("data") or {}).values():  # loader settings change speed, not results
            if isinstance(ds, dict):
                ds.pop("workers", None)
                ds.pop("prefetch", None)
        (data.get("descendants") or {}).pop("pretrain_checkpoint_every", None)  # operational, as the loaders'
        drop_defaults_added_later(data)
        picked = {s: dig(data, s) for s in sections} if sections else data
        if sections and picked.get("precision") == "fp32":
            del picked["precision"]
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    # What changes a sweep's results: its experiment identity. Everything else (ray.address,
    # resources, concurrency, threads, failure retries, storage, report settings, cache and output
    # folders, device and tf32) is operational and may change between a run and its --resume.
    # ray.tune.trial_workers is in it: data-parallel fine-tuning shards each batch over its workers.
    RESULT_SECTIONS: ClassVar[tuple[str, ...]] = (
        "seed",
        "precision",
        "ancestor",
        "data",
        "learngene",
        "descendants",
        "ray.tune.num_samples",
        "ray.tune.startup_samples",
        "ray.tune.search_space",
        "ray.tune.grace_period",
        "ray.tune.reduction_factor",
        "ray.tune.trial_workers",
    )

    def experiment_fingerprint(self) -> str:
        """The experiment's identity: a hash of RESULT_SECTIONS (names its Tune experiments)."""
        return self.fingerprint(*self.RESULT_SECTIONS)

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))
