"""ModelSpec: the shape and architecture flags of a two-tower open_clip CLIP, and the open_clip
features the learngene cannot carry. The bottom of the core's layers: config and models both import
it, it imports neither (open_clip only inside unsupported_features, for flagged specs)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ConfigError(ValueError):
    """Raised by validators: `field` is relative to the model being validated (load_config prefixes
    the model's location, e.g. "width" inside descendants.grid; "" in a field validator: that field),
    `fix` says what to write instead."""

    def __init__(self, field: str, message: str, fix: str):
        self.field, self.message, self.fix = field, message, fix
        super().__init__(f"{field}: {message} (fix: {fix})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# open_clip config keys that ModelSpec holds as typed fields (never as flags)
_VISION_SHAPE_KEYS = {
    "layers": "image_depth",
    "width": "image_width",
    "head_width": "head_width",
    "mlp_ratio": "mlp_ratio",
    "patch_size": "patch_size",
    "image_size": "image_size",
}
_TEXT_SHAPE_KEYS = {
    "layers": "text_depth",
    "width": "text_width",
    "heads": "text_head_width (width / heads)",
    "mlp_ratio": "text_mlp_ratio",
    "context_length": "context_length",
    "vocab_size": "vocab_size",
}


class ModelSpec(_Strict):
    """Shape and architecture flags of a two-tower open_clip CLIP (or one of its towers).

    The shape fields are what descendants change (depth, width per tower); everything else is the
    ancestor's architecture and is carried unchanged into the learngene and every descendant:
    per-tower head width and MLP ratio, QuickGELU, and any further open_clip `vision_cfg` /
    `text_cfg` field (layer scale, attentional pooling, pool types, no_causal_mask,
    final_ln_after_pool, proj_bias, norm/act kwargs, ...) verbatim in `vision_flags` / `text_flags`.
    Features the learngene cannot carry yet are refused with an error naming them
    (models.unsupported_features), never dropped.
    """

    image_depth: int = Field(4, ge=1)
    text_depth: int = Field(4, ge=1)
    image_width: int = Field(128, ge=1)
    text_width: int = Field(128, ge=1)
    head_width: int = Field(
        64, ge=1, description="image-tower head width (and the text tower's unless text_head_width)"
    )
    text_head_width: Optional[int] = Field(None, ge=1, description="text-tower head width (ViT-H-14: 64 vs 80)")
    mlp_ratio: float = Field(
        4.0, gt=0, description="image-tower MLP ratio (and the text tower's unless text_mlp_ratio)"
    )
    text_mlp_ratio: Optional[float] = Field(None, gt=0)
    patch_size: int = Field(8, ge=1)
    image_size: int = Field(32, ge=1)
    context_length: int = Field(32, ge=2)
    vocab_size: int = Field(49408, ge=2)
    embed_dim: int = Field(64, ge=1)
    quick_gelu: bool = False
    vision_flags: dict = Field(default_factory=dict, description="further open_clip vision_cfg fields")
    text_flags: dict = Field(default_factory=dict, description="further open_clip text_cfg fields")

    @model_validator(mode="after")
    def _check(self):
        for tower in ("image", "text"):
            w, hw = self.width(tower), self.head_width_of(tower)
            if w % hw:
                raise ConfigError(
                    f"{tower}_width", f"{w} is not a multiple of the {tower} head width {hw}", f"use a multiple of {hw}"
                )
            shared = max(self.image_width, self.text_width)
            if shared % hw:
                raise ConfigError(
                    f"{tower}_width",
                    f"the learngene's shared width {shared} is not whole {tower} " f"heads of {hw}",
                    f"make the wider tower a multiple of {hw}",
                )
            if self.mlp_hidden(tower) < 1:
                raise ConfigError(
                    f"{tower}_width", f"{tower}_width * mlp_ratio is below 1", "raise the width or the MLP ratio"
                )
        if self.image_size % self.patch_size:
            raise ConfigError(
                "image_size",
                f"{self.image_size} is not a multiple of patch_size={self.patch_size}",
                "use a multiple of patch_size",
            )
        for side, flags, shape in (
            ("vision_flags", self.vision_flags, _VISION_SHAPE_KEYS),
            ("text_flags", self.text_flags, _TEXT_SHAPE_KEYS),
        ):
            clash = sorted(set(flags) & set(shape))
            if clash:
                raise ConfigError(f"{side}.{clash[0]}", "is a shape field", f"set it as {shape[clash[0]]}")
        if self.vision_flags or self.text_flags:
            bad = unsupported_features(self.vision_flags, self.text_flags)
            if bad:
                raise ConfigError(
                    "vision_flags" if any(k in self.vision_flags for k in bad[:1]) else "text_flags",
                    f"{bad[0]} is not supported yet by the learngene",
                    "use an architecture without it",
                )
        return self

    def heads(self, tower: str) -> int:
        return self.width(tower) // self.head_width_of(tower)

    def head_width_of(self, tower: str) -> int:
        return self.text_head_width or self.head_width if tower == "text" else self.head_width

    def mlp_ratio_of(self, tower: str) -> float:
        return self.text_mlp_ratio or self.mlp_ratio if tower == "text" else self.mlp_ratio

    def mlp_hidden(self, tower: str, width: int | None = None) -> int:
        """open_clip's MLP width for this tower at `width` (int(width * mlp_ratio), as open_clip computes it)."""
        return int((width or self.width(tower)) * self.mlp_ratio_of(tower))

    def layer_scale(self, tower: str) -> float | None:
        """The tower's layer-scale init value (None: no layer scale, no ls_1/ls_2 tensors)."""
        return (self.vision_flags if tower == "image" else self.text_flags).get("ls_init_value")

    def depth(self, tower: str) -> int:
        return getattr(self, f"{tower}_depth")

    def width(self, tower: str) -> int:
        return getattr(self, f"{tower}_width")


# open_clip top-level model config fields a supported architecture may carry
_TOP_OK = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "cast_dtype"}


def unsupported_features(vision: dict, text: dict, top: dict | None = None) -> list[str]:
    """Features of an open_clip model config that the learngene cannot carry (yet), each named the way
    open_clip's config names it. Empty: the architecture is supported exactly."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # open_clip is imported only for flagged specs

    bad = []
    top = top or {}
    if top.get("multimodal_cfg"):
        bad.append("multimodal_cfg (CoCa's multimodal text decoder)")
    vf = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    tf = {f.name for f in dataclasses.fields(CLIPTextCfg)}
    for k in vision:
        if k not in vf:
            bad.append(f"vision_cfg.{k} (not an open_clip vision_cfg field)")
    for k in text:
        if k not in tf:
            bad.append(f"text_cfg.{k} (not an open_clip text_cfg field)")
    if vision.get("timm_model_name"):
        bad.append(
            f"vision_cfg.timm_model_name={vision['timm_model_name']} (a timm image tower, not a ViT "
            "of residual blocks)"
        )
    if isinstance(vision.get("layers"), (list, tuple)):
        bad.append("vision_cfg.layers as a list (a ModifiedResNet image tower)")
    if text.get("hf_model_name"):
        bad.append(f"text_cfg.hf_model_name={text['hf_model_name']} (a Hugging Face text tower)")
    if top.get("custom_text"):
        bad.append("custom_text (CustomTextCLIP parameter layout)")
    if top.get("init_logit_bias") is not None:
        bad.append("init_logit_bias (SigLIP's sigmoid loss)")
    if top.get("nonscalar_logit_scale"):
        bad.append("nonscalar_logit_scale")
    for k in set(top) - _TOP_OK - {"custom_text", "multimodal_cfg", "init_logit_bias", "nonscalar_logit_scale"}:
        bad.append(f"{k} (top-level model config field)")
    for side, cfg in (("vision_cfg", vision), ("text_cfg", text)):
        if cfg.get("block_type") not in (None, "default"):
            bad.append(f"{side}.block_type={cfg['block_type']}")
        for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
            if cfg.get(k):
                bad.append(f"{side}.{k} (custom attention block)")
        if cfg.get("output_tokens"):
            bad.append(f"{side}.output_tokens")
        if cfg.get("pool_type") == "none":
            bad.append(f"{side}.pool_type=none (no pooled embedding)")
    if vision.get("pos_embed_type", "learnable") != "learnable":
        bad.append(f"vision_cfg.pos_embed_type={vision['pos_embed_type']}")
    if isinstance(vision.get("attentional_pool"), str):
        bad.append(
            f"vision_cfg.attentional_pool={vision['attentional_pool']} (open_clip's untested "
            "parallel/cascade pooler)"
        )
    if isinstance(vision.get("image_size"), (list, tuple)) and len(set(vision["image_size"])) > 1:
        bad.append("vision_cfg.image_size non-square")
    if text.get("hf_tokenizer_name"):
        bad.append(
            f"text_cfg.hf_tokenizer_name={text['hf_tokenizer_name']} (a Hugging Face tokenizer; the "
            "data pipeline tokenizes with open_clip's BPE)"
        )
    if text.get("embed_cls"):
        bad.append("text_cfg.embed_cls (CoCa's appended class token)")
    if text.get("proj_type", "linear") != "linear":
        bad.append(f"text_cfg.proj_type={text['proj_type']}")
    return bad
