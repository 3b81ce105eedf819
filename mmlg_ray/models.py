"""open_clip models from a ModelSpec, and the parameter-name conventions the learngene relies on.

Image-text models are `open_clip.CLIP`; an image-only model is open_clip's VisionTransformer held
under `.visual` (so its names match CLIP's: `visual.*`); a text-only model is open_clip's
TextTransformer, whose names already match CLIP's top-level text names.
"""
from __future__ import annotations

import torch
from torch import nn

import open_clip
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower

from .config import ModelSpec

TOWERS = ("image", "text")

# Every open_clip residual block holds exactly these tensors.
LAYER_PARAMS = (
    "ln_1.weight", "ln_1.bias",
    "attn.in_proj_weight", "attn.in_proj_bias",
    "attn.out_proj.weight", "attn.out_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)

LAYER_PREFIX = {"image": "visual.transformer.resblocks.", "text": "transformer.resblocks."}


def towers_of(modality: str) -> tuple[str, ...]:
    return {"image": ("image",), "text": ("text",), "image_text": ("image", "text")}[modality]


def layer_name(tower: str, layer: int, param: str) -> str:
    return f"{LAYER_PREFIX[tower]}{layer}.{param}"


def parse_layer_name(name: str):
    """'visual.transformer.resblocks.3.attn.in_proj_weight' -> ('image', 3, 'attn.in_proj_weight')."""
    for tower, prefix in LAYER_PREFIX.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            layer, param = rest.split(".", 1)
            return tower, int(layer), param
    return None


def tower_of_name(name: str) -> str | None:
    """Which tower a non-layer open_clip parameter belongs to (None: shared, e.g. logit_scale)."""
    if name.startswith("visual."):
        return "image"
    if name.startswith(("logit_scale", "logit_bias")):
        return None
    return "text"


def vision_cfg(spec: ModelSpec) -> dict:
    return dict(layers=spec.image_depth, width=spec.image_width, head_width=spec.head_width,
                mlp_ratio=spec.mlp_ratio, patch_size=spec.patch_size, image_size=spec.image_size)


def text_cfg(spec: ModelSpec) -> dict:
    return dict(context_length=spec.context_length, vocab_size=spec.vocab_size, width=spec.text_width,
                heads=spec.heads("text"), layers=spec.text_depth, mlp_ratio=spec.mlp_ratio)


def open_clip_model_cfg(spec: ModelSpec) -> dict:
    """open_clip's `model_cfg` schema (what model_configs/*.json and local-dir checkpoints hold)."""
    return {"embed_dim": spec.embed_dim, "vision_cfg": vision_cfg(spec), "text_cfg": text_cfg(spec)}


def spec_from_open_clip_cfg(cfg: dict) -> ModelSpec:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    width = v.get("width", 768)
    head_width = v.get("head_width", 64)
    return ModelSpec(
        image_depth=v["layers"], text_depth=t["layers"], image_width=width, text_width=t["width"],
        head_width=head_width, mlp_ratio=v.get("mlp_ratio", 4.0), patch_size=v["patch_size"],
        image_size=v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0],
        context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
        embed_dim=cfg["embed_dim"])


class ImageTower(nn.Module):
    """open_clip's vision tower alone, held under `.visual` so parameter names match CLIP's."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.visual = _build_vision_tower(spec.embed_dim, CLIPVisionCfg(**vision_cfg(spec)))

    def forward(self, image):
        return self.visual(image)

    def encode_image(self, image, normalize: bool = False):
        f = self.visual(image)
        return nn.functional.normalize(f, dim=-1) if normalize else f


def build_model(spec: ModelSpec, modality: str = "image_text") -> nn.Module:
    """A freshly initialized open_clip model of this shape (open_clip's own init)."""
    if modality == "image_text":
        return open_clip.CLIP(spec.embed_dim, CLIPVisionCfg(**vision_cfg(spec)), CLIPTextCfg(**text_cfg(spec)))
    if modality == "image":
        return ImageTower(spec)
    if modality == "text":
        # open_clip's TextTransformer: its names already equal CLIP's top-level text names.
        return _build_text_tower(spec.embed_dim, CLIPTextCfg(**text_cfg(spec)))
    raise ValueError(f"unknown modality {modality!r}")


def image_features(model: nn.Module, images, normalize: bool = True):
    f = model.encode_image(images) if hasattr(model, "encode_image") else model(images)
    return nn.functional.normalize(f, dim=-1) if normalize else f


def text_features(model: nn.Module, texts, normalize: bool = True):
    f = model.encode_text(texts) if hasattr(model, "encode_text") else model(texts)
    return nn.functional.normalize(f, dim=-1) if normalize else f


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """open_clip's default BPE tokenizer (vocab ships with open_clip_torch; works offline)."""
    return open_clip.tokenize(list(texts), context_length=context_length)
