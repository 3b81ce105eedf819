"""Does an open_clip architecture work as the ancestor, and compute what open_clip computes?

    python benchmarks/architectures.py          # the table for every architecture open_clip lists

For one architecture: read its spec the way the pipeline does (models.spec_from_arch), build the
reference with open_clip itself from open_clip's own model config (optionally at reduced depth,
the only change), build ours from the spec, load the reference's weights into ours (strict), and
compare image and text embeddings on the same inputs. Unsupported architectures give the one-line
error the pipeline gives.
"""

from __future__ import annotations

import copy
import time

import torch

from mmlg_ray.errors import UserError


def reference_model(arch: str, layers: int | None = None):
    """open_clip's own model of `arch` (random init), its tower depths optionally reduced to `layers`."""
    import open_clip

    if layers is None:
        return open_clip.create_model(arch, pretrained=None)
    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    cfg["vision_cfg"]["layers"] = min(layers, cfg["vision_cfg"].get("layers", 12))
    cfg["text_cfg"]["layers"] = min(layers, cfg["text_cfg"].get("layers", 12))
    return open_clip.CLIP(**cfg)


def compare(arch: str, layers: int | None = None, batch: int = 2, seed: int = 0) -> dict:
    """{'arch', 'supported', 'error' | 'image_rel_err', 'text_rel_err', 'params', 'seconds'}."""
    from mmlg_ray.method.models import build_model, spec_from_arch

    t0 = time.perf_counter()
    try:
        spec = spec_from_arch(arch)
    except UserError as e:
        return {"arch": arch, "supported": False, "error": str(e)}
    torch.manual_seed(seed)
    ref = reference_model(arch, layers).eval()
    if layers is not None:
        spec = spec.model_copy(
            update=dict(image_depth=min(layers, spec.image_depth), text_depth=min(layers, spec.text_depth))
        )
    ours = build_model(spec, "image_text").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g)
    # real-looking token rows: start token, random ids, end token (the argmax pool looks for it), padding
    tokens = torch.zeros(batch, spec.context_length, dtype=torch.long)
    for i in range(batch):
        n = 3 + i
        tokens[i, 0] = spec.vocab_size - 2
        tokens[i, 1:n] = torch.randint(1, spec.vocab_size - 2, (n - 1,), generator=g)
        tokens[i, n] = spec.vocab_size - 1
    out = {
        "arch": arch,
        "supported": True,
        "params": sum(p.numel() for p in ref.parameters()),
        "image_depth": spec.image_depth,
        "text_depth": spec.text_depth,
    }
    with torch.no_grad():
        for name, a, b in (
            ("image", ref.encode_image(images), ours.encode_image(images)),
            ("text", ref.encode_text(tokens), ours.encode_text(tokens)),
        ):
            out[f"{name}_rel_err"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    out["seconds"] = time.perf_counter() - t0
    return out
