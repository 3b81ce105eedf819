"""Width reduction by uniform selection ("weight selection"), for every tensor kind of a CLIP tower.

Three index spaces exist inside a residual block, and each is reduced on its own:

* the residual stream (width D -> d): indices round(linspace(0, D-1, d));
* the attention head space (also D wide, = heads x head_width): whole heads are selected,
  round(linspace(0, H-1, h)) with head_width fixed, so every head of the narrow model is exactly
  one head of the wide model (its Q, K and V rows and its out_proj columns stay paired);
* the MLP hidden space (mlp_ratio * D -> mlp_ratio * d): uniform as for the residual stream.

Packed Q/K/V (`attn.in_proj_weight`, 3D x D) is handled as three matrices. Indexing is
differentiable, so gradients reach the wide tensor through the selection.
"""

from __future__ import annotations

import torch


def uniform_idx(n_from: int, n_to: int, device=None) -> torch.Tensor:
    if n_to > n_from:
        raise ValueError(f"cannot select {n_to} of {n_from}: learngene widths only shrink")
    return torch.linspace(0, n_from - 1, n_to, device=device).round().long()


def head_idx(width_from: int, width_to: int, head_width: int, device=None) -> torch.Tensor:
    h_from, h_to = width_from // head_width, width_to // head_width
    heads = uniform_idx(h_from, h_to, device)
    offs = torch.arange(head_width, device=device)
    return (heads[:, None] * head_width + offs[None, :]).reshape(-1)


def _take(t: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(axis, idx)


def select_layer_tensor(
    param: str, t: torch.Tensor, width_from: int, width_to: int, head_width: int, hidden_to: int | None = None
) -> torch.Tensor:
    """Reduce one residual-block tensor from a tower of width `width_from` to `width_to`.

    `head_width` is the tower's own head width; `hidden_to` the target MLP width (open_clip's
    int(width_to * mlp_ratio)); by default the source's hidden/width ratio applied to `width_to`."""
    dev = t.device
    if param in ("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight"):
        hidden_from = t.shape[0] if param.startswith("mlp.c_fc") else t.shape[-1]
        if hidden_to is None:
            hidden_to = int(round(hidden_from / width_from * width_to))
        if width_from == width_to and hidden_from == hidden_to:
            return t
        m = uniform_idx(hidden_from, hidden_to, dev)
    elif width_from == width_to:
        return t
    if width_from % head_width or width_to % head_width:
        raise ValueError(f"{param}: widths {width_from} -> {width_to} are not whole heads of {head_width}")
    r = uniform_idx(width_from, width_to, dev)
    h = head_idx(width_from, width_to, head_width, dev)
    if param in (
        "ln_1.weight",
        "ln_1.bias",
        "ln_2.weight",
        "ln_2.bias",
        "attn.out_proj.bias",
        "mlp.c_proj.bias",
        "ls_1.gamma",
        "ls_2.gamma",
    ):
        return _take(t, 0, r)
    if param == "attn.in_proj_weight":
        q, k, v = t.chunk(3, dim=0)
        return torch.cat([_take(_take(x, 0, h), 1, r) for x in (q, k, v)], dim=0)
    if param == "attn.in_proj_bias":
        return torch.cat([_take(x, 0, h) for x in t.chunk(3, dim=0)], dim=0)
    if param == "attn.out_proj.weight":
        return _take(_take(t, 0, r), 1, h)
    if param == "mlp.c_fc.weight":
        return _take(_take(t, 0, m), 1, r)
    if param == "mlp.c_fc.bias":
        return _take(t, 0, m)
    if param == "mlp.c_proj.weight":
        return _take(_take(t, 0, r), 1, m)
    raise KeyError(f"no selection rule for layer tensor {param!r}")


# Non-layer tensors: which axis is the tower width (None: not width-dependent).
_INHERITED_WIDTH_AXIS = {
    "visual.conv1.weight": 0,
    "visual.class_embedding": 0,
    "visual.positional_embedding": 1,
    "visual.ln_pre.weight": 0,
    "visual.ln_pre.bias": 0,
    "visual.ln_post.weight": 0,
    "visual.ln_post.bias": 0,
    "visual.proj": 0,
    # attentional pooler (vision_cfg.attentional_pool): queries live in the embedding space, keys and
    # values come from the tower's tokens
    "visual.attn_pool.query": None,
    "visual.attn_pool.ln_q.weight": None,
    "visual.attn_pool.ln_q.bias": None,
    "visual.attn_pool.ln_k.weight": 0,
    "visual.attn_pool.ln_k.bias": 0,
    "visual.attn_pool.attn.q_proj_weight": None,
    "visual.attn_pool.attn.k_proj_weight": 1,
    "visual.attn_pool.attn.v_proj_weight": 1,
    "visual.attn_pool.attn.in_proj_bias": None,
    "visual.attn_pool.attn.out_proj.weight": None,
    "visual.attn_pool.attn.out_proj.bias": None,
    "token_embedding.weight": 1,
    "positional_embedding": 1,
    "ln_final.weight": 0,
    "ln_final.bias": 0,
    "text_projection": 0,
    "text_projection.weight": 1,
    "text_projection.bias": None,  # text_cfg.proj_bias: an nn.Linear
    "logit_scale": None,
    "logit_bias": None,
}
# With an attentional pooler, ln_post and proj act on the pooler's output (embed_dim wide), not the tower.
_ATTN_POOL_FIXED = {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
_PACKED_POOL = "visual.attn_pool.attn.in_proj_weight"


def select_inherited(
    name: str,
    t: torch.Tensor,
    width_from: int,
    width_to: int,
    context_length: int | None = None,
    attn_pool: bool = False,
) -> torch.Tensor:
    """Reduce a non-layer tensor (embeddings, norms, projections) to a narrower tower."""
    if name not in _INHERITED_WIDTH_AXIS:
        raise KeyError(f"no selection rule for non-layer tensor {name!r}")
    if name == "positional_embedding" and context_length is not None:
        if context_length > t.shape[0]:
            raise ValueError(f"context_length {context_length} exceeds the source's {t.shape[0]}")
        t = t[:context_length]
    axis = None if attn_pool and name in _ATTN_POOL_FIXED else _INHERITED_WIDTH_AXIS[name]
    if axis is None or width_from == width_to:
        return t
    return _take(t, axis, uniform_idx(width_from, width_to, t.device))


def select_inherited_state(
    state: dict[str, torch.Tensor],
    width_from: int,
    width_to: int,
    embed_dim: int,
    context_length: int | None = None,
    attn_pool: bool = False,
) -> dict[str, torch.Tensor]:
    """Width-select a tower's non-layer tensors. An attentional pooler whose key/value width equals
    embed_dim packs Q, K, V into one in_proj_weight (torch's MultiheadAttention); a narrower tower
    needs them apart, so the packed matrix is split into q/k/v_proj_weight first."""
    out = {}
    for name, t in state.items():
        if name == _PACKED_POOL and width_to != embed_dim:
            q, k, v = t.chunk(3, dim=0)
            pre = name.rsplit(".", 1)[0]
            for n, x in (("q_proj_weight", q), ("k_proj_weight", k), ("v_proj_weight", v)):
                out[f"{pre}.{n}"] = select_inherited(f"{pre}.{n}", x, width_from, width_to, attn_pool=True)
        elif name == _PACKED_POOL:
            out[name] = t
        else:
            out[name] = select_inherited(name, t, width_from, width_to, context_length, attn_pool)
    pre = _PACKED_POOL.rsplit(".", 1)[0]
    if width_to == embed_dim and f"{pre}.k_proj_weight" in out:  # the narrower tower packs them again
        out[_PACKED_POOL] = torch.cat(
            [out.pop(f"{pre}.{n}") for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")], dim=0
        )
    return out
