import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmlg_ray import cost
from mmlg_ray.config import ModelSpec
from mmlg_ray.models import build_model

SPECS = [
    ModelSpec(image_depth=2, text_depth=3, image_width=128, text_width=64, embed_dim=32, image_size=16,
              patch_size=8, context_length=16),
    ModelSpec(),  # the local ancestor
    ModelSpec(image_depth=1, text_depth=1, image_width=192, text_width=128, mlp_ratio=2.0, embed_dim=48,
              image_size=32, patch_size=4, context_length=20, vocab_size=1000),
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("modality", ["image", "text", "image_text"])
def test_param_count_matches_open_clip_exactly(spec, modality):
    model = build_model(spec, modality)
    assert cost.model_params(spec, modality) == sum(p.numel() for p in model.parameters())


def test_paper_scale_param_count():
    from mmlg_ray.models import spec_from_arch as _spec_for_arch
    import open_clip
    spec = _spec_for_arch("ViT-B-16")
    model = open_clip.create_model("ViT-B-16")  # architecture only, no weights
    assert cost.model_params(spec) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", SPECS)
def test_training_flops_against_torch_flop_counter(spec):
    """Measured by torch.utils.flop_counter with attention on SDPA's math path (so QK^T and AV
    are counted as bmm): forward matches exactly; forward+backward within 5% of 3x forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = build_model(spec).train()
    x = torch.randn(2, 3, spec.image_size, spec.image_size)
    t = torch.randint(1, 999, (2, spec.context_length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        img, txt, _ = model(x, t)
    assert fc.get_total_flops() / 2 == cost.forward_flops(spec)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        img, txt, _ = model(x, t)
        (img.sum() + txt.sum()).backward()
    measured = fc.get_total_flops()
    predicted = cost.train_flops(spec, "image_text", 2)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
