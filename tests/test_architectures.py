"""Real open_clip architectures as ancestors, and their flags carried through the learngene into every
descendant, in miniature: towers of different widths and head widths, widths narrower than the
learngene, QuickGELU, layer scale, attentional pooling, pool types, no_causal_mask, proj_bias."""

import json

import open_clip
import pytest
import torch

from mmlg_ray.method.archcheck import compare
from mmlg_ray.config import ModelSpec, load_config
from mmlg_ray.method.descend import descendant_spec, export_descendant, init_descendant
from mmlg_ray.errors import UserError
from mmlg_ray.method.learngene import AuxCLIP, Learngene, LearngeneMeta, load_learngene, save_learngene, split_state
from mmlg_ray.method.models import build_model, layer_name, layer_params, spec_from_arch
from mmlg_ray.method.select import select_layer_tensor

# A miniature of ViT-H-14's shape problems: image heads 40 wide, text heads 32 wide, towers 160 / 128,
# different MLP ratios, plus every flag the learngene must carry.
FLAGGED = ModelSpec(
    image_depth=3,
    text_depth=2,
    image_width=160,
    text_width=128,
    head_width=40,
    text_head_width=32,
    mlp_ratio=4.0,
    text_mlp_ratio=2.0,
    patch_size=8,
    image_size=16,
    context_length=12,
    embed_dim=80,
    quick_gelu=True,
    vision_flags={"ls_init_value": 0.5, "attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
    text_flags={"pool_type": "last", "no_causal_mask": True, "proj_bias": True},
)
PLAIN_UNEQUAL = ModelSpec(
    image_depth=2,
    text_depth=2,
    image_width=192,
    text_width=128,
    head_width=64,
    embed_dim=32,
    image_size=16,
    patch_size=8,
    context_length=8,
)


def _inputs(spec, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, spec.image_size, spec.image_size, generator=g)
    tokens = torch.randint(1, 400, (n, spec.context_length), generator=g)
    return images, tokens


def _learngene(spec, tmp_path, schedule="tleg", method="mmlg"):
    """A learngene with random tensors (every one non-trivial) and an ancestor's inherited tensors."""
    torch.manual_seed(0)
    ancestor = build_model(spec)
    meta = LearngeneMeta(method=method, schedule=schedule, spec=spec.model_dump(), knots=3)
    lg = Learngene(meta)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lg.tensors.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] < 5 else 0))
    _, inherited = split_state({k: v for k, v in ancestor.state_dict().items() if k != "attn_mask"})
    aux = AuxCLIP(lg, inherited)
    path = tmp_path / f"{method}-{schedule}.safetensors"
    save_learngene(path, aux.learngene, aux.inherited_state())
    return aux, load_learngene(path)


@pytest.mark.parametrize("spec", [PLAIN_UNEQUAL, FLAGGED], ids=["192-128", "flagged-160-128"])
@pytest.mark.parametrize("schedule", ["tleg", "learned"])
def test_descendants_agree_with_the_auxiliary_model_at_every_width(spec, schedule, tmp_path):
    aux, lg = _learngene(spec, tmp_path, schedule)
    with torch.no_grad():
        aux_layers = aux.layer_tensors()
    worst = 0.0
    hw = spec.head_width
    for width in (spec.image_width, spec.image_width // hw // 2 * hw, hw):  # own shape, about half, one head
        d = descendant_spec(spec, max(spec.image_depth, spec.text_depth), width)
        d = d.model_copy(update=dict(image_depth=spec.image_depth, text_depth=spec.text_depth))
        for tower in ("image", "text"):
            got = lg.expand(tower, spec.depth(tower), d.width(tower))
            for l in range(spec.depth(tower)):
                for p in layer_params(spec, tower):
                    n = layer_name(tower, l, p)
                    want = select_layer_tensor(
                        p,
                        aux_layers[n],
                        spec.width(tower),
                        d.width(tower),
                        spec.head_width_of(tower),
                        d.mlp_hidden(tower),
                    )
                    worst = max(worst, float((got[n] - want).abs().max()))
    assert worst == 0.0
    # at the learngene's own shape the descendant *is* the auxiliary model
    model = init_descendant("mmlg", "image_text", spec, learngene=lg).eval()
    images, tokens = _inputs(spec)
    with torch.no_grad():
        a_img, a_txt, _ = aux(images, tokens)
        d_img, d_txt, _ = model(images, tokens)
    torch.testing.assert_close(d_img, a_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(d_txt, a_txt, rtol=0, atol=1e-6)


def test_selecting_the_shared_block_straight_to_the_descendant_width_would_differ(tmp_path):
    """The bug the composition fixes: for unequal towers the two index sets do not line up."""
    aux, lg = _learngene(PLAIN_UNEQUAL, tmp_path)
    m = lg.get("multimodal.mlp.c_fc.weight")
    straight = select_layer_tensor("mlp.c_fc.weight", m, 192, 64, 64)
    composed = select_layer_tensor(
        "mlp.c_fc.weight", select_layer_tensor("mlp.c_fc.weight", m, 192, 128, 64), 128, 64, 64
    )
    assert not torch.equal(straight, composed)


def test_flags_reach_descendants_exports_and_open_clip(tmp_path):
    _, lg = _learngene(FLAGGED, tmp_path)
    assert lg.meta.model_spec == FLAGGED  # the learngene records the architecture
    for width in (120, 80):  # 80 == embed_dim: the attentional pooler packs Q/K/V again
        spec = descendant_spec(FLAGGED, 2, width)
        assert spec.quick_gelu and spec.vision_flags == FLAGGED.vision_flags and spec.text_head_width == 32
        model = init_descendant("mmlg", "image_text", spec, learngene=lg).eval()
        assert any(n.endswith("ls_1.gamma") for n, _ in model.named_parameters())
        out = tmp_path / f"desc{width}"
        export_descendant(model, spec, "image_text", out)
        cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
        assert cfg["quick_gelu"] and cfg["vision_cfg"]["attentional_pool"] and cfg["text_cfg"]["pool_type"] == "last"
        loaded = open_clip.create_model(f"local-dir:{out}").eval()
        images, tokens = _inputs(spec)
        with torch.no_grad():
            for a, b in zip(model(images, tokens)[:2], loaded(images, tokens)[:2]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        # single towers compute exactly what the two-tower model's towers compute
        img_only = init_descendant("mmlg", "image", spec, learngene=lg).eval()
        txt_only = init_descendant("mmlg", "text", spec, learngene=lg).eval()
        with torch.no_grad():
            torch.testing.assert_close(img_only.encode_image(images), model.encode_image(images), rtol=0, atol=0)
            torch.testing.assert_close(txt_only(tokens), model.encode_text(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["weight_selection", "heur_lg"])
def test_ancestor_methods_carry_the_flags(method):
    torch.manual_seed(0)
    ancestor = build_model(FLAGGED)
    state = {k: v for k, v in ancestor.state_dict().items() if k != "attn_mask"}
    for width in (120, 80):
        spec = descendant_spec(FLAGGED, 2, width)
        model = init_descendant(method, "image_text", spec, ancestor_state=state, ancestor_spec=FLAGGED).eval()
        images, tokens = _inputs(spec)
        with torch.no_grad():
            img, txt, _ = model(images, tokens)
        assert img.shape == (3, 80) and torch.isfinite(img).all() and torch.isfinite(txt).all()


@pytest.mark.slow  # over 10 s
def test_every_open_clip_architecture_is_exact_or_refused():
    """Walk open_clip's whole list: each either computes exactly what open_clip computes on the same
    weights (towers at depth 1 to fit memory) or is refused with one line naming the feature."""
    supported, refused = [], []
    for arch in open_clip.list_models():
        r = compare(arch, layers=1, batch=1)
        if r["supported"]:
            assert r["image_rel_err"] == 0.0 and r["text_rel_err"] == 0.0, r
            supported.append(arch)
        else:
            assert "\n" not in r["error"] and "is not supported yet" in r["error"], r
            refused.append(arch)
    for arch in ("ViT-B-16", "ViT-B-32-quickgelu", "ViT-L-14", "ViT-H-14", "ViT-bigG-14", "ViT-M-16-alt"):
        assert arch in supported
    assert "coca_ViT-B-32" in refused and "ViT-B-16-SigLIP" in refused and "RN50" in refused


def test_architecture_flags_are_read_from_open_clip():
    h14 = spec_from_arch("ViT-H-14")
    assert (h14.image_width, h14.head_width, h14.text_width, h14.head_width_of("text")) == (1280, 80, 1024, 64)
    assert spec_from_arch("ViT-B-32-quickgelu").quick_gelu
    assert spec_from_arch("ViT-M-16-alt").layer_scale("image") == 1e-4
    big = spec_from_arch("ViT-bigG-14")
    assert big.mlp_hidden("image") == 8192 and big.mlp_hidden("text") == 5120
    # the config reads the spec from the architecture, and grid widths are checked against it
    cfg = load_config(
        None,
        [
            "ancestor.source=checkpoint",
            "ancestor.arch=ViT-H-14",
            "ancestor.checkpoint=/",
            "descendants.grid.width=[640]",
        ],
    )
    assert cfg.ancestor.spec == h14
    with pytest.raises(UserError, match="descendants.grid.width"):
        load_config(
            None,
            [
                "ancestor.source=checkpoint",
                "ancestor.arch=ViT-H-14",
                "ancestor.checkpoint=/",
                "descendants.grid.width=[600]",
            ],
        )


def test_quick_gelu_matters_and_is_kept():
    """Built without QuickGELU, the same weights give other embeddings: the flag is not cosmetic."""
    spec = FLAGGED.model_copy(update=dict(vision_flags={}, text_flags={}))
    torch.manual_seed(0)
    quick = build_model(spec).eval()
    plain = build_model(spec.model_copy(update=dict(quick_gelu=False))).eval()
    plain.load_state_dict(quick.state_dict())
    images, tokens = _inputs(spec)
    with torch.no_grad():
        assert (quick.encode_image(images) - plain.encode_image(images)).abs().max() > 1e-4


def test_unsupported_flags_in_a_hand_written_spec_are_refused():
    with pytest.raises(UserError, match="qk_norm"):
        load_config(None, ["ancestor.spec.vision_flags={qk_norm: true}"])
    with pytest.raises(UserError, match="not an open_clip"):
        load_config(None, ["ancestor.spec.text_flags={mystery: 1}"])
    with pytest.raises(UserError, match="image_width"):
        load_config(None, ["ancestor.spec.vision_flags={width: 512}"])


def test_weights_trained_with_quick_gelu_get_it_whatever_the_arch_config_says():
    """ViT-B-16/openai: open_clip's ViT-B-16 config says GELU, the OpenAI weights were trained with
    QuickGELU. The spec follows the weights (no download needed to know)."""
    cfg = load_config(None, ["ancestor.source=open_clip", "ancestor.arch=ViT-B-16", "ancestor.pretrained=openai"])
    assert cfg.ancestor.spec.quick_gelu
    cfg = load_config(
        None, ["ancestor.source=open_clip", "ancestor.arch=ViT-B-16", "ancestor.pretrained=laion2b_s34b_b88k"]
    )
    assert not cfg.ancestor.spec.quick_gelu
    from mmlg_ray.method.models import weights_need_quick_gelu

    mismatched = [
        (a, t)
        for a, t in open_clip.list_pretrained()
        if weights_need_quick_gelu(a, t) and not (open_clip.get_model_config(a) or {}).get("quick_gelu")
    ]
    assert ("ViT-L-14", "openai") in mismatched
