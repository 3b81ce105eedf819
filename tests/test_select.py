import pytest
import torch

from mmlg_ray.method.learngene import block_shapes
from mmlg_ray.method.models import LAYER_PARAMS
from mmlg_ray.method.select import head_idx, select_inherited, select_layer_tensor, uniform_idx


def _block(width, ratio=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(s, generator=g) for p, s in block_shapes(width, int(width * ratio)).items()}


@pytest.mark.parametrize("param", LAYER_PARAMS)
def test_full_width_selection_is_identity(param):
    t = _block(128)[param]
    assert torch.equal(select_layer_tensor(param, t, 128, 128, 64), t)


def test_uniform_indices():
    assert uniform_idx(5, 3).tolist() == [0, 2, 4]
    assert uniform_idx(128, 128).tolist() == list(range(128))
    with pytest.raises(ValueError):
        uniform_idx(3, 5)


def test_narrow_selection_keeps_whole_heads_for_q_k_v_and_out_proj():
    D, d, hw = 256, 128, 64  # 4 heads -> 2 heads
    b = _block(D)
    heads = head_idx(D, d, hw)
    kept = sorted(set((heads // hw).tolist()))
    assert kept == [0, 3]  # round(linspace(0, 3, 2))
    assert (heads.view(2, hw) - heads.view(2, hw)[:, :1] == torch.arange(hw)).all()  # contiguous heads
    r = uniform_idx(D, d)
    w = select_layer_tensor("attn.in_proj_weight", b["attn.in_proj_weight"], D, d, hw)
    assert w.shape == (3 * d, d)
    for i in range(3):  # Q, K, V each: rows of the kept heads, columns of the kept residual dims
        big = b["attn.in_proj_weight"][i * D : (i + 1) * D]
        assert torch.equal(w[i * d : (i + 1) * d], big[heads][:, r])
        # narrow head j is exactly wide head kept[j]
        for j, h in enumerate(kept):
            assert torch.equal(w[i * d + j * hw : i * d + (j + 1) * hw], big[h * hw : (h + 1) * hw][:, r])
    bias = select_layer_tensor("attn.in_proj_bias", b["attn.in_proj_bias"], D, d, hw)
    assert torch.equal(bias[d : 2 * d], b["attn.in_proj_bias"][D : 2 * D][heads])
    out = select_layer_tensor("attn.out_proj.weight", b["attn.out_proj.weight"], D, d, hw)
    assert torch.equal(out, b["attn.out_proj.weight"][r][:, heads])


def test_mlp_and_norm_selection_shapes_and_values():
    D, d = 128, 64
    b = _block(D)
    shapes = block_shapes(d, 4 * d)
    for p in LAYER_PARAMS:
        assert select_layer_tensor(p, b[p], D, d, 64).shape == shapes[p], p
    m = uniform_idx(4 * D, 4 * d)
    r = uniform_idx(D, d)
    assert torch.equal(
        select_layer_tensor("mlp.c_fc.weight", b["mlp.c_fc.weight"], D, d, 64), b["mlp.c_fc.weight"][m][:, r]
    )
    assert torch.equal(select_layer_tensor("ln_2.weight", b["ln_2.weight"], D, d, 64), b["ln_2.weight"][r])


def test_selected_block_runs_in_open_clip_block():
    from open_clip.transformer import ResidualAttentionBlock

    D, d = 128, 64
    wide = ResidualAttentionBlock(D, D // 64, batch_first=True)
    narrow = ResidualAttentionBlock(d, d // 64, batch_first=True)
    state = {p: select_layer_tensor(p, t, D, d, 64) for p, t in wide.state_dict().items()}
    narrow.load_state_dict(state)
    y = narrow(torch.randn(2, 5, d))
    assert y.shape == (2, 5, d) and torch.isfinite(y).all()


def test_selection_passes_gradient_to_the_wide_tensor():
    t = torch.randn(384, 128, requires_grad=True)
    select_layer_tensor("attn.in_proj_weight", t, 128, 64, 64).sum().backward()
    assert (t.grad != 0).sum() == 3 * 64 * 64


def test_inherited_selection():
    pos = torch.randn(16, 128)
    out = select_inherited("positional_embedding", pos, 128, 64, context_length=8)
    assert out.shape == (8, 64) and torch.equal(out, pos[:8][:, uniform_idx(128, 64)])
    conv = torch.randn(128, 3, 8, 8)
    assert select_inherited("visual.conv1.weight", conv, 128, 64).shape == (64, 3, 8, 8)
    with pytest.raises(KeyError):
        select_inherited("visual.mystery", conv, 128, 64)
