"""Parameter counts and training FLOPs for any CLIP tower spec, at any scale. Counts follow open_clip's default ViT / text transformer exactly (checked against instantiated models in tests). FLOPs count a multiply-add as 2; a training step is forward + backward = 3x forward; attention's sequence-length terms (QK^T and AV) are included."""

from __future__ import annotations


from mmlg_ray.config import ModelSpec
from mmlg_ray.method.models import towers_of


def layer_params(width: int, mlp_ratio: float, layer_scale: bool = False) -> int:
    d, h = width, int(width * mlp_ratio)  # open_clip's MLP width
    return (
        (2 * d)
        + (3 * d * d + 3 * d)
        + (d * d + d)
        + (2 * d)
        + (h * d + h)
        + (d * h + d)
        + (2 * d if layer_scale else 0)
    )


def tokens(spec: ModelSpec, tower: str) -> int:
    if tower == "image":
        return (spec.image_size // spec.patch_size) ** 2 + 1
    return spec.context_length


def tower_params(spec: ModelSpec, tower: str, layers_only: bool = False) -> int:
    d, depth = spec.width(tower), spec.depth(tower)
    body = depth * layer_params(d, spec.mlp_ratio_of(tower), spec.layer_scale(tower) is not None)
    if layers_only:
        return body
    if tower == "image":
        p = spec.patch_size
        return (3 * p * p * d) + d + tokens(spec, "image") * d + 2 * d + body + 2 * d + d * spec.embed_dim
    return spec.vocab_size * d + spec.context_length * d + body + 2 * d + d * spec.embed_dim


def model_params(spec: ModelSpec, modality: str = "image_text") -> int:
    n = sum(tower_params(spec, t) for t in towers_of(modality))
    return n + (1 if modality == "image_text" else 0)  # logit_scale


def tower_forward_flops(spec: ModelSpec, tower: str) -> int:
    """Forward FLOPs of one sample through one tower."""
    d, n, depth = spec.width(tower), tokens(spec, tower), spec.depth(tower)
    h = spec.mlp_hidden(tower)
    per_layer = 2 * n * d * 3 * d + 2 * n * n * d * 2 + 2 * n * d * d + 2 * n * d * h * 2
    flops = depth * per_layer + 2 * d * spec.embed_dim
    if tower == "image":
        flops += 2 * (n - 1) * 3 * spec.patch_size**2 * d
    return flops


def forward_flops(spec: ModelSpec, modality: str = "image_text") -> int:
    return sum(tower_forward_flops(spec, t) for t in towers_of(modality))


def train_flops(spec: ModelSpec, modality: str, samples: int) -> int:
    """Forward + backward FLOPs of `samples` training samples."""
    return 3 * forward_flops(spec, modality) * samples


def extraction_flops(aux_spec: ModelSpec, teacher_spec: ModelSpec, samples: int) -> int:
    """Student forward+backward plus the frozen teacher's forward, per the cost accounting."""
    return train_flops(aux_spec, "image_text", samples) + forward_flops(teacher_spec, "image_text") * samples
