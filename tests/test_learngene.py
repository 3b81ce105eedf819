import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmlg_ray.config import ModelSpec
from mmlg_ray.errors import UserError
from mmlg_ray.method.learngene import AuxCLIP, Learngene, LearngeneMeta, load_learngene, save_learngene
from mmlg_ray.method.models import LAYER_PARAMS, layer_name
from mmlg_ray.method.select import select_layer_tensor

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(
    image_depth=3,
    text_depth=2,
    image_width=128,
    text_width=64,
    embed_dim=32,
    image_size=16,
    patch_size=8,
    context_length=8,
)

# The schedules written out independently of the implementation: (a, b) at layer l of depth L.
EXPECTED = {
    "tleg": lambda l, L: (1.0, l / L),
    "convex": lambda l, L: (1.0 - l / L, l / L),
    "constant": lambda l, L: (1.0, 1.0),
}


def _randomized(meta):
    lg = Learngene(meta)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lg.tensors.values():
            p.copy_(torch.randn(p.shape, generator=g))
    return lg


@pytest.mark.parametrize("schedule", ["tleg", "convex", "constant", "learned"])
@pytest.mark.parametrize("width", [None, 64])
def test_expansion_equals_formula_tensor_by_tensor(schedule, width):
    meta = LearngeneMeta(method="mmlg", schedule=schedule, spec=SPEC.model_dump(), knots=3)
    lg = _randomized(meta)
    for tower in ("image", "text"):
        depth = 5
        d = width or SPEC.width(tower)
        out = lg(tower, depth, width)
        assert len(out) == depth * len(LAYER_PARAMS)
        for l in range(depth):
            if schedule == "learned":
                knots_a, knots_b = lg.get(f"coeff.{tower}.a"), lg.get(f"coeff.{tower}.b")
                x = l / depth * 2  # 3 knots at t = 0, 0.5, 1
                i = min(int(x), 1)
                a = knots_a[i] * (1 - (x - i)) + knots_a[i + 1] * (x - i)
                b = knots_b[i] * (1 - (x - i)) + knots_b[i + 1] * (x - i)
            else:
                a, b = EXPECTED[schedule](l, depth)
            for p in LAYER_PARAMS:
                m = select_layer_tensor(p, lg.get(f"multimodal.{p}"), 128, d, 64)
                u = select_layer_tensor(p, lg.get(f"unimodal.{tower}.{p}"), SPEC.width(tower), d, 64)
                torch.testing.assert_close(out[layer_name(tower, l, p)], a * m + b * u)


def test_tleg_learngene_has_no_shared_block():
    meta = LearngeneMeta(method="tleg", schedule="tleg", spec=SPEC.model_dump())
    lg = _randomized(meta)
    names = lg.state_tensors().keys()
    assert not any(n.startswith("multimodal.") for n in names)
    out = lg("image", 4)
    p = "mlp.c_fc.weight"
    torch.testing.assert_close(
        out[layer_name("image", 2, p)], lg.get(f"base.image.{p}") + 0.5 * lg.get(f"unimodal.image.{p}")
    )


@pytest.mark.parametrize("width", [None, 64])
def test_attention_only_sharing_shares_attention_and_keeps_each_towers_mlp(width, tmp_path):
    """learngene.shared=attention: the multimodal block holds only the attention half (at the wider tower's
    width, narrowed per tower); each tower's MLP half comes from its own base block, as TLEG's."""
    from mmlg_ray.method.learngene import is_attention_param

    meta = LearngeneMeta(method="mmlg", schedule="tleg", spec=SPEC.model_dump(), shared="attention")
    lg = _randomized(meta)
    names = set(lg.state_tensors())
    attn = [p for p in LAYER_PARAMS if is_attention_param(p)]
    mlp = [p for p in LAYER_PARAMS if not is_attention_param(p)]
    assert attn and mlp and {"ln_1.weight", "attn.in_proj_weight"} <= set(attn) and "mlp.c_fc.weight" in mlp
    assert {n for n in names if n.startswith("multimodal.")} == {f"multimodal.{p}" for p in attn}
    for tower in ("image", "text"):
        assert {n for n in names if n.startswith(f"base.{tower}.")} == {f"base.{tower}.{p}" for p in mlp}
        d, depth = width or SPEC.width(tower), 4
        out = lg(tower, depth, width)
        for l in range(depth):
            for p in LAYER_PARAMS:
                base = (
                    select_layer_tensor(p, lg.get(f"multimodal.{p}"), 128, d, 64)
                    if p in attn
                    else select_layer_tensor(p, lg.get(f"base.{tower}.{p}"), SPEC.width(tower), d, 64)
                )
                u = select_layer_tensor(p, lg.get(f"unimodal.{tower}.{p}"), SPEC.width(tower), d, 64)
                torch.testing.assert_close(out[layer_name(tower, l, p)], base + l / depth * u)
    # between the two in size, and the setting survives the file
    n = {
        s: sum(
            t.numel()
            for t in _randomized(LearngeneMeta(method=m, schedule="tleg", spec=SPEC.model_dump(), shared=sh))
            .state_tensors()
            .values()
        )
        for s, m, sh in (("mmlg", "mmlg", "all"), ("attention", "mmlg", "attention"), ("tleg", "tleg", "all"))
    }
    assert n["mmlg"] < n["attention"] < n["tleg"]
    aux = AuxCLIP(lg)
    save_learngene(tmp_path / "lg.safetensors", lg, aux.inherited_state())
    back = load_learngene(tmp_path / "lg.safetensors")
    assert back.meta.shared == "attention"
    for k, v in back.expand("text", 3, width).items():
        torch.testing.assert_close(v, lg("text", 3, width)[k])


def test_learned_schedule_starts_as_tleg():
    meta = LearngeneMeta(method="mmlg", schedule="learned", spec=SPEC.model_dump(), knots=4)
    lg = Learngene(meta)
    ref = Learngene(LearngeneMeta(method="mmlg", schedule="tleg", spec=SPEC.model_dump()))
    ref.load_state_dict({k: v for k, v in lg.state_dict().items() if "coeff" not in k})
    for k, v in lg("image", 6).items():
        torch.testing.assert_close(v, ref("image", 6)[k])


def _aux():
    meta = LearngeneMeta(method="mmlg", schedule="tleg", spec=SPEC.model_dump())
    return AuxCLIP(_randomized(meta))


def test_shared_block_gets_gradient_from_each_tower_alone():
    aux = _aux()
    images = torch.randn(4, 3, 16, 16)
    texts = torch.randint(1, 1000, (4, 8))
    for tower, args in (("image", (images, None)), ("text", (None, texts))):
        aux.zero_grad()
        img, txt, _ = aux(*args)
        (img if tower == "image" else txt).pow(2).sum().backward()
        g = aux.learngene.tensors
        shared = g["multimodal__attn__in_proj_weight"].grad
        assert shared is not None and shared.abs().sum() > 0, tower
        other = "text" if tower == "image" else "image"
        own = g[f"unimodal__{tower}__mlp__c_fc__weight"].grad
        assert own is not None and own.abs().sum() > 0
        assert (
            g[f"unimodal__{other}__mlp__c_fc__weight"].grad is None
            or g[f"unimodal__{other}__mlp__c_fc__weight"].grad.abs().sum() == 0
        )
    # the layer tensors are not parameters of the auxiliary CLIP: only the learngene trains them
    assert not any(".resblocks." in n for n, _ in aux.named_parameters())


def test_materialized_aux_matches_functional_forward():
    aux = _aux().eval()
    images, texts = torch.randn(2, 3, 16, 16), torch.randint(1, 1000, (2, 8))
    a = aux(images, texts)
    b = aux.materialize().eval()(images, texts)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_file_round_trip_and_corruption(tmp_path):
    aux = _aux()
    path = tmp_path / "lg.safetensors"
    aux.learngene.meta.cost = {"steps": 3, "flops": 1.0}
    save_learngene(path, aux.learngene, aux.inherited_state())
    lg = load_learngene(path)
    assert lg.meta.method == "mmlg" and lg.meta.cost["steps"] == 3
    for k, v in aux.learngene.state_tensors().items():
        assert torch.equal(lg.tensors[k], v)
    assert "inherited.visual.conv1.weight" in lg.tensors and "inherited.token_embedding.weight" in lg.tensors
    assert any(k.startswith("multimodal.") for k in lg.tensors)
    assert any(k.startswith("unimodal.text.") for k in lg.tensors)
    # corrupt one byte of tensor data, near the end of the file
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupt"):
        load_learngene(bad)
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/descend.py"),
            "--learngene",
            str(bad),
            "--modality",
            "image",
            "--depth",
            "2",
            "--out",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "corrupt" in r.stderr and not (tmp_path / "d").exists()
    (tmp_path / "trunc.safetensors").write_bytes(bytes(raw[:100]))
    with pytest.raises(UserError, match="not a readable"):
        load_learngene(tmp_path / "trunc.safetensors")
