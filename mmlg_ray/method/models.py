"""open_clip models from a ModelSpec, and the parameter-name conventions the learngene relies on.

Models are built by open_clip's own tower builders from open_clip's own config schema
(`open_clip_model_cfg`), so an ancestor computes exactly what open_clip computes on the same
weights, with every architecture flag (QuickGELU, per-tower head width, layer scale, attentional
pooling, pool types, ...). Image-text models are `open_clip.CLIP`; an image-only model is open_clip's
VisionTransformer held under `.visual` (so its names match CLIP's: `visual.*`); a text-only model is
open_clip's TextTransformer, whose names already match CLIP's top-level text names.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import open_clip
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower

from mmlg_ray.method.spec import ModelSpec, unsupported_features
from mmlg_ray.errors import UserError

TOWERS = ("image", "text")

# Every open_clip residual block holds exactly these tensors ...
LAYER_PARAMS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
# ... plus these where the tower has layer scale (ls_init_value set).
LAYER_SCALE_PARAMS = ("ls_1.gamma", "ls_2.gamma")

LAYER_PREFIX = {"image": "visual.transformer.resblocks.", "text": "transformer.resblocks."}

# The open_clip config fields that ModelSpec holds as typed fields (everything else is a flag).
_VISION_SHAPE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_TEXT_SHAPE = {"layers", "width", "heads", "mlp_ratio", "context_length", "vocab_size"}


def layer_params(spec: ModelSpec, tower: str) -> tuple[str, ...]:
    """The residual-block tensor names of `tower` (layer-scale gammas where the tower has them)."""
    return LAYER_PARAMS + (LAYER_SCALE_PARAMS if spec.layer_scale(tower) is not None else ())


def towers_of(modality: str) -> tuple[str, ...]:
    return {"image": ("image",), "text": ("text",), "image_text": ("image", "text")}[modality]


def layer_name(tower: str, layer: int, param: str) -> str:
    return f"{LAYER_PREFIX[tower]}{layer}.{param}"


def parse_layer_name(name: str):
    """'visual.transformer.resblocks.3.attn.in_proj_weight' -> ('image', 3, 'attn.in_proj_weight')."""
    for tower, prefix in LAYER_PREFIX.items():
        if name.startswith(prefix):
            rest = name[len(prefix) :]
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


# --------------------------------------------------------------------------- architecture support
def spec_from_open_clip_cfg(cfg: dict, name: str = "model", field: str = "ancestor.arch") -> ModelSpec:
    """A ModelSpec that builds exactly open_clip's model of this config, or a UserError naming the
    first feature the learngene cannot carry."""
    v, t = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    top = {k: val for k, val in cfg.items() if k not in ("vision_cfg", "text_cfg")}
    bad = unsupported_features(v, t, top)
    if bad:
        raise UserError(
            field,
            f"{name}: {bad[0]} is not supported yet",
            "choose a ViT CLIP with a plain open_clip text transformer, e.g. ViT-B-16",
        )
    vd = {f.name: f.default for f in dataclasses.fields(CLIPVisionCfg)}
    td = {f.name: f.default for f in dataclasses.fields(CLIPTextCfg)}
    image_size = v.get("image_size", vd["image_size"])
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    text_width = t.get("width", td["width"])
    text_heads = t.get("heads", td["heads"])
    if text_width % text_heads:
        raise UserError(field, f"{name}: text width {text_width} is not a multiple of its {text_heads} heads")
    v_mlp, t_mlp = float(v.get("mlp_ratio", vd["mlp_ratio"])), float(t.get("mlp_ratio", td["mlp_ratio"]))
    vision_flags = {k: val for k, val in v.items() if k not in _VISION_SHAPE}
    text_flags = {k: val for k, val in t.items() if k not in _TEXT_SHAPE}
    try:
        return ModelSpec(
            image_depth=v.get("layers", vd["layers"]),
            text_depth=t.get("layers", td["layers"]),
            image_width=v.get("width", vd["width"]),
            text_width=text_width,
            head_width=v.get("head_width", vd["head_width"]),
            text_head_width=text_width // text_heads,
            mlp_ratio=v_mlp,
            text_mlp_ratio=t_mlp,
            patch_size=v.get("patch_size", vd["patch_size"]),
            image_size=image_size,
            context_length=t.get("context_length", td["context_length"]),
            vocab_size=t.get("vocab_size", td["vocab_size"]),
            embed_dim=cfg["embed_dim"],
            quick_gelu=bool(cfg.get("quick_gelu", False)),
            vision_flags=vision_flags,
            text_flags=text_flags,
        )
    except Exception as e:  # pydantic ValidationError: a shape open_clip accepts but ModelSpec does not
        raise UserError(field, f"{name}: {str(e).splitlines()[-1].strip()}") from None


def spec_from_arch(arch: str, field: str = "ancestor.arch") -> ModelSpec:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise UserError(
            field, f"{arch!r} is not an open_clip architecture", "see open_clip.list_models(), e.g. ViT-B-16"
        )
    return spec_from_open_clip_cfg(cfg, arch, field)


def weights_need_quick_gelu(arch: str, pretrained: str) -> bool:
    """Whether open_clip's pretrained tag was trained with QuickGELU (OpenAI's weights, MetaCLIP, DFN
    and others), although the architecture's own config may say GELU (open_clip only warns)."""
    try:
        return bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu"))
    except Exception:  # an unknown tag is reported where the weights are loaded
        return False


def vision_cfg(spec: ModelSpec) -> dict:
    return dict(
        layers=spec.image_depth,
        width=spec.image_width,
        head_width=spec.head_width,
        mlp_ratio=spec.mlp_ratio_of("image"),
        patch_size=spec.patch_size,
        image_size=spec.image_size,
        **spec.vision_flags,
    )


def text_cfg(spec: ModelSpec) -> dict:
    return dict(
        context_length=spec.context_length,
        vocab_size=spec.vocab_size,
        width=spec.text_width,
        heads=spec.heads("text"),
        layers=spec.text_depth,
        mlp_ratio=spec.mlp_ratio_of("text"),
        **spec.text_flags,
    )


def open_clip_model_cfg(spec: ModelSpec) -> dict:
    """open_clip's `model_cfg` schema (what model_configs/*.json and local-dir checkpoints hold)."""
    cfg = {"embed_dim": spec.embed_dim, "vision_cfg": vision_cfg(spec), "text_cfg": text_cfg(spec)}
    if spec.quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


class ImageTower(nn.Module):
    """open_clip's vision tower alone, held under `.visual` so parameter names match CLIP's."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.visual = _build_vision_tower(spec.embed_dim, CLIPVisionCfg(**vision_cfg(spec)), spec.quick_gelu)

    def forward(self, image):
        return self.visual(image)

    def encode_image(self, image, normalize: bool = False):
        f = self.visual(image)
        return nn.functional.normalize(f, dim=-1) if normalize else f


def build_model(spec: ModelSpec, modality: str = "image_text") -> nn.Module:
    """A freshly initialized open_clip model of this shape (open_clip's own init)."""
    if modality == "image_text":
        return open_clip.CLIP(
            spec.embed_dim, CLIPVisionCfg(**vision_cfg(spec)), CLIPTextCfg(**text_cfg(spec)), quick_gelu=spec.quick_gelu
        )
    if modality == "image":
        return ImageTower(spec)
    if modality == "text":
        # open_clip's TextTransformer: its names already equal CLIP's top-level text names.
        return _build_text_tower(spec.embed_dim, CLIPTextCfg(**text_cfg(spec)), spec.quick_gelu)
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
