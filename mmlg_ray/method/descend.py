"""Descendants: their shapes, their initialization by method, and their export as open_clip files.

Methods:
  mmlg              layers expanded from the MM-LG learngene (shared + unimodal blocks)
  tleg              layers expanded from a TLEG learngene (per tower, no shared block)
  weight_selection  the ancestor's first L layers, uniformly width-selected
  heur_lg           the ancestor's last k layers on top (k = heur_lg_layers, default ceil(L/2)),
                    open_clip's random init below
  scratch           open_clip's random init
  pt_ft             a descendant of this shape pre-trained on the same corpus (see pretrain_descendant)
  csm               a descendant of this shape trained by BeamCLIP cross-modal similarity matching
All learngene-style methods (mmlg, tleg, weight_selection, heur_lg) also inherit the non-layer
tensors (embeddings, norms, projections), width-selected; scratch/pt_ft/csm inherit nothing.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from mmlg_ray.atomic import atomic_dir
from mmlg_ray.config import SELECTION_METHODS, ModelSpec
from mmlg_ray.data import MEAN, STD
from mmlg_ray.method.learngene import LoadedLearngene, inherited_for, split_state
from mmlg_ray.method.models import build_model, layer_name, layer_params, open_clip_model_cfg, towers_of
from mmlg_ray.method.select import select_layer_tensor


def descendant_spec(
    ancestor: ModelSpec, depth: int, width: int, image_depth: int | None = None, text_depth: int | None = None
) -> ModelSpec:
    """A descendant shape. `width` is the image-tower width; the text tower keeps the ancestor's
    text/image width ratio (rounded to whole text heads), so a grid width means the same for every
    modality. Head widths, MLP ratios and every architecture flag are the ancestor's."""
    hw = ancestor.head_width_of("text")
    text_w = max(hw, int(round(ancestor.text_width * width / ancestor.image_width / hw)) * hw)
    text_w = min(text_w, ancestor.text_width)
    image_w = min(width, ancestor.image_width)
    return ancestor.model_copy(
        update=dict(
            image_depth=image_depth or depth, text_depth=text_depth or depth, image_width=image_w, text_width=text_w
        )
    )


def _ancestor_layers(state, src_spec: ModelSpec, dst_spec: ModelSpec, tower: str, mapping: dict[int, int]):
    out = {}
    for dst, src in mapping.items():
        for p in layer_params(src_spec, tower):
            out[layer_name(tower, dst, p)] = select_layer_tensor(
                p,
                state[layer_name(tower, src, p)],
                src_spec.width(tower),
                dst_spec.width(tower),
                src_spec.head_width_of(tower),
                dst_spec.mlp_hidden(tower),
            )
    return out


def init_descendant(
    method: str,
    modality: str,
    spec: ModelSpec,
    *,
    seed: int = 0,
    learngene: LoadedLearngene | None = None,
    ancestor_state: dict | None = None,
    ancestor_spec: ModelSpec | None = None,
    pretrained_state: dict | None = None,
    heur_lg_layers: int | None = None,
) -> nn.Module:
    """A plain open_clip model of `spec` (towers per `modality`) initialized by `method`."""
    torch.manual_seed(seed)
    model = build_model(spec, modality)
    towers = towers_of(modality)
    state: dict[str, torch.Tensor] = {}
    if method in ("mmlg", "tleg"):
        if learngene is None:
            raise ValueError(f"method {method} needs a learngene")
        if learngene.meta.method != method:
            raise ValueError(f"method {method} needs a {method} learngene, got {learngene.meta.method}")
        lg_spec = learngene.meta.model_spec
        for t in towers:
            state.update(learngene.expand(t, spec.depth(t), spec.width(t)))
        state.update(inherited_for(learngene.inherited, lg_spec, spec, towers))
    elif method in SELECTION_METHODS:
        if ancestor_state is None or ancestor_spec is None:
            raise ValueError(f"method {method} needs the ancestor")
        for t in towers:
            la, ld = ancestor_spec.depth(t), spec.depth(t)
            if method == "weight_selection":
                mapping = {l: min(l, la - 1) for l in range(ld)}
            else:
                k = min(heur_lg_layers or math.ceil(ld / 2), ld, la)
                mapping = {ld - k + i: la - k + i for i in range(k)}
            state.update(_ancestor_layers(ancestor_state, ancestor_spec, spec, t, mapping))
        _, rest = split_state(ancestor_state)
        state.update(inherited_for(rest, ancestor_spec, spec, towers))
    elif method in ("pt_ft", "csm"):
        if pretrained_state is None:
            raise ValueError(f"method {method} needs its pre-trained descendant state")
        state = {k: v for k, v in pretrained_state.items() if k in model.state_dict()}
    elif method != "scratch":
        raise ValueError(f"unknown method {method!r}")
    if state:
        own = model.state_dict()
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise ValueError(f"{method}: {k} has shape {tuple(v.shape)}, model wants {tuple(own[k].shape)}")
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        if method in ("mmlg", "tleg", "weight_selection", "pt_ft", "csm"):
            missing = [m for m in missing if m != "attn_mask"]
            if missing:
                raise ValueError(f"{method}: no value for {missing[:4]}")
    return model


def export_descendant(model: nn.Module, spec: ModelSpec, modality: str, out_dir, extra: dict | None = None):
    """Write DIR/open_clip_config.json (open_clip's schema) + DIR/open_clip_model.safetensors.

    An image_text descendant loads with open_clip.create_model("local-dir:DIR"); image-only and
    text-only descendants use the same parameter names for their tower."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "attn_mask"}
    cfg = {
        "model_cfg": open_clip_model_cfg(spec),
        "preprocess_cfg": {
            "mean": MEAN.flatten().tolist(),
            "std": STD.flatten().tolist(),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
        "mmlg_ray": {"modality": modality, **(extra or {})},
    }
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
