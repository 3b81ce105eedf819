"""The multimodal learngene (MM-LG): tensors, expansion rule, schedules, file format, auxiliary CLIP.

A learngene holds, for every residual-block tensor p (see models.LAYER_PARAMS):

* mmlg:  one multimodal block M[p] shared by both towers (stored at the wider tower's width) and
         one unimodal block U_m[p] per tower m (at that tower's width);
* tleg:  per tower a base block A_m[p] and a growth block B_m[p] (TLEG, no shared block).

Expansion of tower m to depth L and width d, layer l = 0..L-1:

    W[m, l, p] = a(l, L) * sel_d(M[p]) + b(l, L) * sel_d(U_m[p])      (mmlg; A_m replaces M for tleg)

with the schedule (a, b) one of: tleg (a=1, b=l/L), convex (a=1-l/L, b=l/L), constant (a=b=1:
every layer identical) or learned (per-tower scalars at K knots over t=l/L, linearly interpolated).
`sel_d` is the uniform weight selection of select.py. This rule is our reconstruction of MM-LG from
its abstract and TLEG's published code; the schedule is a config choice so that it can be ablated.

File: one safetensors file, tensors `multimodal.<p>`, `unimodal.<tower>.<p>` (mmlg) or
`base.<tower>.<p>`, `unimodal.<tower>.<p>` (tleg), `coeff.<tower>.a|b` (learned schedule),
`inherited.<open_clip name>` (non-layer tensors); metadata key "mmlg_ray" holds JSON (docs/files.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from mmlg_ray.atomic import atomic_path
from mmlg_ray.config import ModelSpec
from mmlg_ray.errors import UserError
from mmlg_ray.method.models import build_model, layer_name, layer_params, parse_layer_name
from mmlg_ray.method.select import select_inherited_state, select_layer_tensor

EXTRACTION_MODES = ("fixed", "elastic")

FORMAT_VERSION = 1


# --------------------------------------------------------------------------- schedules
def coefficients(schedule: str, layer: int, depth: int, knots_a=None, knots_b=None):
    """(a, b) for layer `layer` of `depth`; tensors when the schedule is learned."""
    t = layer / depth
    if schedule == "tleg":
        return 1.0, t
    if schedule == "convex":
        return 1.0 - t, t
    if schedule == "constant":
        return 1.0, 1.0
    if schedule == "learned":
        return _interp(knots_a, t), _interp(knots_b, t)
    raise ValueError(f"unknown schedule {schedule!r}")


def _interp(knots: torch.Tensor, t: float):
    k = knots.shape[0]
    x = t * (k - 1)
    i = min(int(x), k - 2)
    w = x - i
    return knots[i] * (1 - w) + knots[i + 1] * w


def block_shapes(width: int, hidden: int, layer_scale: bool = False) -> dict[str, tuple[int, ...]]:
    d, h = width, hidden
    shapes = {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.in_proj_weight": (3 * d, d),
        "attn.in_proj_bias": (3 * d,),
        "attn.out_proj.weight": (d, d),
        "attn.out_proj.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "mlp.c_fc.weight": (h, d),
        "mlp.c_fc.bias": (h,),
        "mlp.c_proj.weight": (d, h),
        "mlp.c_proj.bias": (d,),
    }
    if layer_scale:
        shapes.update({"ls_1.gamma": (d,), "ls_2.gamma": (d,)})
    return shapes


@dataclass
class LearngeneMeta:
    method: str  # mmlg | tleg
    schedule: str
    spec: dict  # the auxiliary model's ModelSpec (ancestor widths and flags, aux depths)
    knots: int = 4
    format_version: int = FORMAT_VERSION
    ancestor_fingerprint: str = ""
    extraction: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    tensors_sha256: str = ""
    extraction_mode: str = "fixed"  # fixed (the paper's aux shape only) | elastic (also sampled grid shapes)
    shared: str = "all"  # mmlg: the part of each block both towers share: all | attention (MLP per tower)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(**self.spec)

    def width(self, tower: str) -> int:
        return self.model_spec.width(tower)

    @property
    def shared_width(self) -> int:
        s = self.model_spec
        return max(s.image_width, s.text_width)

    @property
    def shared_hidden(self) -> int:
        s = self.model_spec
        return max(s.mlp_hidden("image"), s.mlp_hidden("text"))

    def shares(self, param: str) -> bool:
        """Whether both towers read this block tensor from the multimodal block."""
        return self.method == "mmlg" and (self.shared == "all" or is_attention_param(param))

    def base_block(self, tower: str, param: str) -> tuple[str, int, bool]:
        """(block name, its width, shared) of the block that multiplies a(l, L) for this tower's `param`."""
        if self.shares(param):
            return "multimodal", self.shared_width, True
        return f"base.{tower}", self.width(tower), False


SHARED_PARTS = ("all", "attention")


def is_attention_param(param: str) -> bool:
    """The attention half of a residual block (its LayerNorm, projections and layer-scale); the rest is the MLP."""
    return param.startswith(("ln_1.", "attn.", "ls_1."))


def expand_tower(
    get, meta: LearngeneMeta, tower: str, depth: int, width: int | None = None, prefix: bool = True
) -> dict[str, torch.Tensor]:
    """Every residual-block tensor of `tower` at `depth` x `width` from learngene tensors `get(name)`.

    Selections compose exactly as extraction used them: the shared block is first narrowed to the
    tower's own learngene width (what the auxiliary model computed), and the tower's layer is then
    narrowed to the descendant's width, so that a descendant at the learngene's shape reproduces the
    auxiliary model's layers exactly, and a narrower one is a selection of them."""
    spec = meta.model_spec
    tw, hw = spec.width(tower), spec.head_width_of(tower)
    width = width or tw
    t_hidden, d_hidden = spec.mlp_hidden(tower), spec.mlp_hidden(tower, width)
    params = layer_params(spec, tower)
    knots_a = get(f"coeff.{tower}.a") if meta.schedule == "learned" else None
    knots_b = get(f"coeff.{tower}.b") if meta.schedule == "learned" else None

    def narrow(p, t, w_from, h_from):  # learngene width -> tower width -> descendant width
        t = select_layer_tensor(p, t, w_from, tw, hw, t_hidden) if (w_from, h_from) != (tw, t_hidden) else t
        return select_layer_tensor(p, t, tw, width, hw, d_hidden)

    sel_base = {}
    for p in params:
        base, base_w, shared = meta.base_block(tower, p)
        sel_base[p] = narrow(p, get(f"{base}.{p}"), base_w, meta.shared_hidden if shared else t_hidden)
    sel_uni = {p: narrow(p, get(f"unimodal.{tower}.{p}"), tw, t_hidden) for p in params}
    out = {}
    for layer in range(depth):
        a, b = coefficients(meta.schedule, layer, depth, knots_a, knots_b)
        for p in params:
            name = layer_name(tower, layer, p) if prefix else f"{layer}.{p}"
            out[name] = a * sel_base[p] + b * sel_uni[p]
    return out


def _key(name: str) -> str:
    return name.replace(".", "__")


def _unkey(key: str) -> str:
    return key.replace("__", ".")


class Learngene(nn.Module):
    """Trainable learngene tensors. forward(tower, depth, width) returns that tower's layer tensors.

    Expansion runs inside forward so that DeepSpeed ZeRO-3 gathers the partitioned tensors first.
    """

    def __init__(self, meta: LearngeneMeta):
        super().__init__()
        self.meta = meta
        self.tensors = nn.ParameterDict()
        for name, shape in self.tensor_shapes(meta).items():
            self.tensors[_key(name)] = nn.Parameter(torch.zeros(shape))
        self.reset_parameters()

    @staticmethod
    def tensor_shapes(meta: LearngeneMeta) -> dict[str, tuple]:
        spec = meta.model_spec
        shapes = {}
        ls = {t: spec.layer_scale(t) is not None for t in ("image", "text")}
        for t in ("image", "text"):
            if spec.width(t) % spec.head_width_of(t) or meta.shared_width % spec.head_width_of(t):
                raise ValueError(
                    f"learngene: the shared width {meta.shared_width} and the {t} width "
                    f"{spec.width(t)} must be whole {t} heads of {spec.head_width_of(t)}"
                )
        if meta.shared not in SHARED_PARTS:
            raise ValueError(f"learngene: shared={meta.shared!r} is not one of {SHARED_PARTS}")
        if meta.method == "mmlg":
            blocks = {"multimodal": (meta.shared_width, meta.shared_hidden, any(ls.values()), True)}
            if meta.shared != "all":  # the part not shared: per tower, as TLEG's base blocks
                blocks.update(
                    {f"base.{t}": (spec.width(t), spec.mlp_hidden(t), ls[t], False) for t in ("image", "text")}
                )
        else:
            blocks = {f"base.{t}": (spec.width(t), spec.mlp_hidden(t), ls[t], False) for t in ("image", "text")}
        blocks.update({f"unimodal.{t}": (spec.width(t), spec.mlp_hidden(t), ls[t], None) for t in ("image", "text")})
        for block, (w, h, has_ls, shared) in blocks.items():
            for p, shape in block_shapes(w, h, has_ls).items():
                if shared is None or meta.method != "mmlg" or meta.shares(p) == shared:
                    shapes[f"{block}.{p}"] = shape
        if meta.schedule == "learned":
            for t in ("image", "text"):
                shapes[f"coeff.{t}.a"] = (meta.knots,)
                shapes[f"coeff.{t}.b"] = (meta.knots,)
        return shapes

    @torch.no_grad()
    def reset_parameters(self):
        """open_clip-like random init; schedule-aware so that every expanded LayerNorm starts at 1 and
        every expanded layer-scale gamma at the architecture's ls_init_value."""
        spec = self.meta.model_spec
        ls_values = [v for v in (spec.layer_scale("image"), spec.layer_scale("text")) if v is not None]
        for key, p in self.tensors.items():
            name = _unkey(key)
            if name.startswith("coeff."):
                t = torch.linspace(0, 1, p.shape[0])
                p.copy_(torch.ones_like(t) if name.endswith(".a") else t)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ls_1.gamma", "ls_2.gamma")):
                if name.endswith("gamma"):
                    tower = name.split(".")[1] if name.startswith(("unimodal.", "base.")) else None
                    value = spec.layer_scale(tower) if tower else ls_values[0]
                else:
                    value = 1.0
                # base/multimodal = value; unimodal = value only where a(l)+b(l) == 1 (convex), else 0
                p.fill_(value if not name.startswith("unimodal") or self.meta.schedule == "convex" else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                nn.init.normal_(p, std=0.02)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[_key(name)]

    def forward(self, tower: str, depth: int, width: int | None = None, prefix: bool = True):
        return expand_tower(self.get, self.meta, tower, depth, width, prefix=prefix)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {_unkey(k): v.detach() for k, v in self.tensors.items()}

    @torch.no_grad()
    def fit_to(
        self, ancestor_state: dict[str, torch.Tensor], ancestor_spec: ModelSpec, steps: int = 150, lr: float = 0.01
    ) -> float:
        """Warm start: least-squares fit of the expansion to the ancestor's layers (depth-resampled).

        Returns the final relative error. Extraction (distillation) then trains from here.
        """
        spec = self.meta.model_spec
        targets = {}
        for tower in ("image", "text"):
            la, lx = ancestor_spec.depth(tower), spec.depth(tower)
            for layer in range(lx):
                src = round(layer * (la - 1) / max(lx - 1, 1)) if lx > 1 else la - 1
                for p in layer_params(spec, tower):
                    w = ancestor_state[layer_name(tower, src, p)].float()
                    targets[layer_name(tower, layer, p)] = select_layer_tensor(
                        p,
                        w,
                        ancestor_spec.width(tower),
                        spec.width(tower),
                        spec.head_width_of(tower),
                        spec.mlp_hidden(tower),
                    )
        params = [p for k, p in self.tensors.items()]
        with torch.enable_grad():
            opt = torch.optim.Adam(params, lr=lr)
            norm = sum(float(t.pow(2).sum()) for t in targets.values())
            for step in range(steps):
                opt.zero_grad()
                loss = 0.0
                for tower in ("image", "text"):
                    out = self(tower, spec.depth(tower))
                    loss = loss + sum((out[n] - targets[n]).pow(2).sum() for n in out)
                (loss / norm).backward()
                opt.step()
        return float(loss / norm) ** 0.5


# --------------------------------------------------------------------------- inherited tensors
def split_state(state: dict[str, torch.Tensor]):
    """(layer tensors, non-layer tensors) of an open_clip state dict."""
    layers, rest = {}, {}
    for k, v in state.items():
        (layers if parse_layer_name(k) else rest)[k] = v
    return layers, rest


def inherited_for(
    inherited: dict[str, torch.Tensor], spec_from: ModelSpec, spec_to: ModelSpec, towers
) -> dict[str, torch.Tensor]:
    """Width-select inherited non-layer tensors for a descendant of shape spec_to."""
    from mmlg_ray.method.models import tower_of_name

    out, per_tower = {}, {t: {} for t in ("image", "text")}
    for name, t in inherited.items():
        tower = tower_of_name(name)
        if tower is None:
            out[name] = t
        elif tower in towers:
            per_tower[tower][name] = t
    for tower, state in per_tower.items():
        out.update(
            select_inherited_state(
                state,
                spec_from.width(tower),
                spec_to.width(tower),
                spec_to.embed_dim,
                spec_to.context_length if tower == "text" else None,
                attn_pool=tower == "image" and bool(spec_to.vision_flags.get("attentional_pool")),
            )
        )
    return out


# --------------------------------------------------------------------------- elastic extraction
def shape_key(depth: int, width: int) -> str:
    return f"d{depth}w{width}"


@dataclass
class ElasticPlan:
    """Which descendant shapes an elastic extraction step distils (the sandwich rule of slimmable /
    once-for-all training): the grid's largest shape (deepest, widest), its smallest, and `count - 2`
    others drawn at random without replacement. A grid of at most `count` shapes is distilled whole
    at every step. The draw depends only on (seed, step), so a resumed run draws what the
    uninterrupted run would have. `specs` maps shape_key(depth, width) to the descendant's ModelSpec
    (mmlg_ray.method.descend.descendant_spec of the ancestor), built exactly as descendants are."""

    specs: dict[str, ModelSpec]
    depths: list[int]
    widths: list[int]
    count: int = 3
    weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.largest = shape_key(max(self.depths), max(self.widths))
        self.smallest = shape_key(min(self.depths), min(self.widths))
        self.keys = [shape_key(d, w) for d in sorted(self.depths) for w in sorted(self.widths)]

    def at(self, step: int) -> list[str]:
        fixed = list(dict.fromkeys([self.largest, self.smallest]))[: self.count]
        rest = [k for k in self.keys if k not in fixed]
        n = max(0, min(self.count - len(fixed), len(rest)))
        drawn = random.Random(self.seed * 1_000_003 + step).sample(rest, n) if n else []
        return fixed + drawn

    def train_flops(self, steps: int, batch: float, start: int = 0) -> int:
        """Training FLOPs (forward + backward) of the sampled shapes over steps start..steps-1, each
        step on `batch` samples (the global batch)."""
        from mmlg_ray.cost import train_flops

        per = {k: train_flops(s, "image_text", 1) for k, s in self.specs.items()}
        return int(round(sum(per[k] for step in range(start, steps) for k in self.at(step)) * batch))

    def describe(self) -> dict:
        return {
            "depths": list(self.depths),
            "widths": list(self.widths),
            "shapes": self.count,
            "weight": self.weight,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------- the auxiliary CLIP
class AuxCLIP(nn.Module):
    """A CLIP whose every residual-block tensor is computed from the learngene on each forward.

    The learngene tensors and the inherited non-layer tensors are the only trainable parameters.

    Elastic extraction: `shapes` maps shape keys to descendant ModelSpecs; for each one the module
    holds a parameter-free open_clip CLIP of that shape (a skeleton) and `forward(..., shapes=[keys])`
    also runs those descendants, their layers expanded from the learngene and their non-layer
    tensors width-selected from the inherited ones, exactly as mmlg_ray.method.descend initializes a
    descendant, and differentiably, so their losses train the same tensors. All of it runs inside
    this module's forward, where DeepSpeed ZeRO-3 gathers the partitioned parameters it touches.
    """

    def __init__(
        self,
        learngene: Learngene,
        inherited: dict[str, torch.Tensor] | None = None,
        shapes: dict[str, ModelSpec] | None = None,
    ):
        super().__init__()
        self.learngene = learngene
        spec = learngene.meta.model_spec
        clip = build_model(spec, "image_text")
        _strip_parameters(clip, layers_only=True)
        if inherited:
            missing, unexpected = clip.load_state_dict(inherited, strict=False)
            unexpected = [u for u in unexpected]
            if unexpected:
                raise ValueError(f"inherited tensors not in the auxiliary CLIP: {unexpected[:5]}")
        self.clip = clip
        self._inherited_names = [n for n, _ in clip.named_parameters()]
        self.shape_specs = dict(shapes or {})
        self.shapes = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):  # skeletons do not move the caller's random stream
            for key, s in self.shape_specs.items():
                self.shapes[key] = _strip_parameters(build_model(s, "image_text"), layers_only=False)

    def layer_tensors(self):
        spec = self.learngene.meta.model_spec
        return {**self.learngene("image", spec.image_depth), **self.learngene("text", spec.text_depth)}

    def forward(self, images=None, texts=None, shapes=None):
        """(image features, text features, logit scale), features L2-normalized, as open_clip.CLIP.
        With `shapes` (keys of the elastic shapes): a tuple of such triples, the auxiliary model's
        first, then one per listed shape."""
        out = functional_call(self.clip, self.layer_tensors(), (images, texts), strict=False)
        if shapes is None:
            return out
        return (out, *(self.shape_forward(k, images, texts) for k in shapes))

    def live_inherited(self) -> dict[str, torch.Tensor]:
        """The inherited non-layer parameters themselves (not detached), read by attribute so that
        under ZeRO-3 each is gathered on access inside the forward."""
        out = {}
        for name in self._inherited_names:
            mod, _, attr = name.rpartition(".")
            out[name] = getattr(self.clip.get_submodule(mod) if mod else self.clip, attr)
        return out

    def shape_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """Every parameter of the elastic shape `key`, as mmlg_ray.method.descend.init_descendant builds it."""
        spec_d = self.shape_specs[key]
        lg_spec = self.learngene.meta.model_spec
        out = {}
        for tower in ("image", "text"):
            out.update(self.learngene(tower, spec_d.depth(tower), spec_d.width(tower)))
        out.update(inherited_for(self.live_inherited(), lg_spec, spec_d, ("image", "text")))
        return out

    def shape_forward(self, key: str, images=None, texts=None):
        return functional_call(self.shapes[key], self.shape_tensors(key), (images, texts), strict=False)

    def inherited_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.clip.state_dict().items() if k != "attn_mask"}

    def materialize(self) -> nn.Module:
        """A plain open_clip.CLIP holding the expanded weights (for evaluation or export)."""
        spec = self.learngene.meta.model_spec
        clip = build_model(spec, "image_text")
        with torch.no_grad():
            state = {**self.inherited_state(), **{k: v.detach() for k, v in self.layer_tensors().items()}}
        clip.load_state_dict(state)
        return clip


def _strip_parameters(model: nn.Module, layers_only: bool) -> nn.Module:
    """Remove the residual-block parameters (or all of them) from an open_clip model, leaving plain
    None attributes that functional_call fills (repr() works: DeepSpeed ZeRO-3 prints modules)."""
    for name, _ in list(model.named_parameters()):
        if layers_only and not parse_layer_name(name):
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        del mod._parameters[attr]
        setattr(mod, attr, None)
    return model


# --------------------------------------------------------------------------- file format
def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a model's weights (the ancestor's fingerprint)."""
    return tensors_digest({k: v.float() for k, v in state.items()})


def save_learngene(path, learngene: Learngene, inherited: dict[str, torch.Tensor]) -> LearngeneMeta:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().float().contiguous() for k, v in learngene.state_tensors().items()}
    tensors.update({f"inherited.{k}": v.detach().cpu().float().contiguous() for k, v in inherited.items()})
    meta = learngene.meta
    meta.tensors_sha256 = tensors_digest(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"mmlg_ray": json.dumps(meta.__dict__, default=str)})
    return meta


@dataclass
class LoadedLearngene:
    meta: LearngeneMeta
    tensors: dict[str, torch.Tensor]

    @property
    def inherited(self) -> dict[str, torch.Tensor]:
        return {k[len("inherited.") :]: v for k, v in self.tensors.items() if k.startswith("inherited.")}

    def get(self, name):
        return self.tensors[name]

    def expand(self, tower: str, depth: int, width: int | None = None) -> dict[str, torch.Tensor]:
        return expand_tower(self.get, self.meta, tower, depth, width)

    def module(self) -> Learngene:
        lg = Learngene(self.meta)
        with torch.no_grad():
            for k, p in lg.tensors.items():
                p.copy_(self.tensors[_unkey(k)])
        return lg


def load_learngene(path) -> LoadedLearngene:
    """Read and verify a learngene file: a local path or a URI (s3://...; read through a local copy)."""
    from mmlg_ray.storage import is_uri, is_file, reading

    if is_uri(path):
        if not is_file(path):
            raise UserError("--learngene", f"{path!r} does not exist", "run jobs/extract.py first")
        with reading(path) as local:
            return _load_learngene(local, name=path)
    return _load_learngene(path)


def _load_learngene(path, name=None) -> LoadedLearngene:
    from safetensors import safe_open

    p = Path(os.path.expanduser(str(path)))
    shown = name or p
    if not p.is_file():
        raise UserError("--learngene", f"file {str(p)!r} does not exist", "run jobs/extract.py first")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("mmlg_ray")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise UserError(
            "--learngene", f"{shown} is not a readable safetensors file ({type(e).__name__})", "re-run the extraction"
        ) from None
    if raw is None:
        raise UserError("--learngene", f"{shown} has no mmlg_ray metadata; not a learngene file")
    meta = LearngeneMeta(**json.loads(raw))
    if meta.format_version != FORMAT_VERSION:
        raise UserError(
            "--learngene",
            f"format version {meta.format_version} is not supported " f"(this build reads {FORMAT_VERSION})",
        )
    digest = tensors_digest(tensors)
    if digest != meta.tensors_sha256:
        raise UserError(
            "--learngene",
            f"{shown} is corrupt: tensor checksum {digest[:12]} does not match "
            f"the recorded {meta.tensors_sha256[:12]}",
            "re-run the extraction",
        )
    return LoadedLearngene(meta, tensors)


# --------------------------------------------------------------------------- the auxiliary CLIP's shape
def aux_spec(cfg, ancestor_spec: ModelSpec) -> ModelSpec:
    """The auxiliary CLIP the learngene is extracted through: the ancestor's shape at the
    learngene's auxiliary depths (cfg.learngene.aux_image_depth / aux_text_depth; 0: the ancestor's)."""
    lg = cfg.learngene
    return ancestor_spec.model_copy(
        update=dict(
            image_depth=lg.aux_image_depth or ancestor_spec.image_depth,
            text_depth=lg.aux_text_depth or ancestor_spec.text_depth,
        )
    )
