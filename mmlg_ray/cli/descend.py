"""Grow one descendant from a learngene file and write it as an open_clip local-dir checkpoint.

    python jobs/descend.py --learngene LG.safetensors --modality image_text \
        --image-depth 4 --text-depth 4 --width 128 --out DIR
    python -c "import open_clip; open_clip.create_model('local-dir:DIR')"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmlg_ray.cli import ArgumentParser
from mmlg_ray.errors import UserError, exits_cleanly


@exits_cleanly
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learngene", required=True, help="learngene .safetensors written by jobs/extract.py (path or URI)")
    p.add_argument("--modality", required=True, choices=["image", "text", "image_text"])
    p.add_argument("--depth", type=int, default=None, help="depth of both towers (or use the per-tower flags)")
    p.add_argument("--image-depth", type=int, default=None)
    p.add_argument("--text-depth", type=int, default=None)
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="image-tower width (text keeps the ancestor's ratio); " "default: the learngene's",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder or URI (open_clip local-dir layout)")
    a = p.parse_args(argv)
    for name in ("depth", "image_depth", "text_depth", "width"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')}", f"must be >= 1, got {v}", "give a positive whole number")
    from mmlg_ray.engine import preflight

    preflight.descend(a.learngene, a.out)  # before anything is computed or written
    from mmlg_ray.method.descend import descendant_spec, export_descendant, init_descendant
    from mmlg_ray.method.learngene import load_learngene

    lg = load_learngene(a.learngene)
    anc = lg.meta.model_spec
    depth = a.depth or max(anc.image_depth, anc.text_depth)
    width = a.width or anc.image_width
    if width % anc.head_width:
        raise UserError(
            "--width",
            f"{width} is not a multiple of the head width {anc.head_width}",
            f"use a multiple of {anc.head_width}",
        )
    if width > anc.image_width:
        raise UserError(
            "--width",
            f"{width} is wider than the learngene ({anc.image_width})",
            "descendants can only be as wide as the learngene or narrower",
        )
    spec = descendant_spec(anc, depth, width, a.image_depth, a.text_depth)
    model = init_descendant(lg.meta.method, a.modality, spec, seed=a.seed, learngene=lg)
    extra = {"method": lg.meta.method, "schedule": lg.meta.schedule, "learngene_sha256": lg.meta.tensors_sha256}
    from mmlg_ray import storage

    if storage.is_uri(a.out):  # written to a local folder, then uploaded
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mmlg-descend-") as d:
            export_descendant(model, spec, a.modality, Path(d) / "out", extra=extra)
            storage.upload(Path(d) / "out", a.out)
    else:
        export_descendant(model, spec, a.modality, Path(a.out), extra=extra)
    n = sum(t.numel() for t in model.parameters())
    print(
        f"wrote {a.out}: {a.modality} descendant, image {spec.image_depth}x{spec.image_width}, "
        f"text {spec.text_depth}x{spec.text_width}, {n:,} parameters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
