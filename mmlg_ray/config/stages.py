"""The stages' settings: extraction, the learngene, the descendants' grid, fine-tuning and seeds."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from mmlg_ray.method.spec import ConfigError, _Strict
from mmlg_ray.config.base import (
    EXTRACTIONS,
    LEARNGENE_METHODS,
    METHODS,
    MODALITIES,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    SCHEDULES,
    Seed,
    TrainConfig,
    _no_duplicates,
)


class ExtractionConfig(TrainConfig):
    steps: PosInt = 120
    lr: PosFloat = 5e-4
    weight_decay: NonNegFloat = 0.05
    warmup_steps: NonNegInt = 10
    distill_weight: float = Field(1.0, ge=0)
    distill_temperature: float = Field(1.0, gt=0)
    feature_weight: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(40, ge=1)
    elastic_weight: float = Field(
        1.0, ge=0, description="elastic extraction: weight of the sampled descendant shapes' mean loss"
    )
    elastic_shapes: int = Field(
        3, ge=1, description="elastic extraction: shapes distilled per step (largest, smallest, then random)"
    )


def drop_defaults_added_later(dumped: dict) -> None:
    """Settings added after artifacts were cached enter a cache key only when they are not their default
    (the behaviour before they existed), so those artifacts keep their keys."""
    lg = dumped.get("learngene")
    if isinstance(lg, dict) and lg.get("shared") == "all":
        del lg["shared"]


class LearngeneConfig(_Strict):
    method: Literal[LEARNGENE_METHODS] = "mmlg"
    schedule: Literal[SCHEDULES] = "tleg"
    learned_knots: int = Field(4, ge=2)
    aux_image_depth: Optional[int] = Field(None, ge=1)
    aux_text_depth: Optional[int] = Field(None, ge=1)
    shared: Literal["all", "attention"] = Field(
        "all",
        description="mmlg: the part of each residual block both towers share: all (the paper's multimodal "
        "block) or attention (the attention half shared, each tower's MLP its own, as TLEG's)",
    )
    extraction: ExtractionConfig = ExtractionConfig()


class GridConfig(_Strict):
    modality: list[Literal[MODALITIES]] = list(MODALITIES)
    depth: list[int] = [1, 2]
    width: list[int] = [128]
    method: list[Literal[METHODS]] = [m for m in METHODS if m not in ("heur_lg", "csm")]
    extraction: list[Literal[EXTRACTIONS]] = Field(
        ["fixed"],
        description="learngene methods (mmlg, tleg): fixed = the paper's auxiliary shape only; elastic = "
        "also distil the grid's sampled descendant shapes during extraction (one learngene each)",
    )

    @model_validator(mode="after")
    def _axes(self):
        examples = {
            "modality": "[image, text, image_text]",
            "depth": "[1, 2]",
            "width": "[64, 128]",
            "method": "[mmlg, scratch]",
            "extraction": "[fixed, elastic]",
        }
        for axis, example in examples.items():
            values = getattr(self, axis)
            if not values:
                raise ConfigError(
                    axis, "is an empty list: the grid would have no cells", f"list at least one value, e.g. {example}"
                )
            _no_duplicates(axis, values)
        for axis in ("depth", "width"):
            for v in getattr(self, axis):
                if v < 1:
                    raise ConfigError(axis, f"{v} is not a positive {axis}", f"every {axis} must be >= 1")
        return self


class FinetuneConfig(TrainConfig):
    steps: PosInt = 40
    batch_size: PosInt = 64
    lr: PosFloat = 5e-4
    weight_decay: NonNegFloat = 0.05
    warmup_steps: NonNegInt = 5
    eval_every: PosInt = 20
    linear_probe: bool = True

    @model_validator(mode="after")
    def _evals(self):
        if self.eval_every > self.steps:
            raise ConfigError(
                "eval_every",
                f"{self.eval_every} is more than steps={self.steps}: a trial would "
                "never be evaluated before its end",
                f"use eval_every <= {self.steps}",
            )
        return self


class DescendantsConfig(_Strict):
    grid: GridConfig = GridConfig()
    seeds: list[Seed] = [0, 1]
    finetune: FinetuneConfig = FinetuneConfig()
    pretrain_steps: Optional[int] = Field(
        None, ge=1, description="pt_ft / csm pre-training steps; default = learngene.extraction.steps"
    )
    pretrain_checkpoint_every: Optional[int] = Field(
        None,
        ge=1,
        description="pt_ft / csm pre-training checkpoints to the output store every this many steps, and a retried "
        "task (a preempted node) resumes from there; default = learngene.extraction.checkpoint_every",
    )
    heur_lg_layers: Optional[int] = Field(None, ge=1, description="heur_lg inherits this many last layers")
    pt_budgets: list[float] = Field(
        [1.0],
        description="pt_ft pre-trains every descendant shape at each of these multiples of the extraction's "
        "sample budget (a ladder, e.g. [0.25, 0.5, 1, 2]: the report interpolates the budget at which PT+FT reaches "
        "MM-LG's score); csm uses 1",
    )

    @field_validator("pt_budgets")
    @classmethod
    def _budgets(cls, v):
        if not v:
            raise ConfigError("", "is an empty list: pt_ft would have no pre-training budget", "list e.g. [1.0]")
        for b in v:
            if not b > 0:
                raise ConfigError("", f"{b} is not a positive budget", "every budget is a multiple > 0, e.g. 0.5")
        v = [float(f"{b:g}") for b in v]  # as arm names and artifact names write it (6 significant digits)
        _no_duplicates("", v)
        return sorted(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v:
            raise ConfigError("", "is an empty list: no trial would run", "list at least one seed, e.g. [0]")
        _no_duplicates("", v)
        return v
