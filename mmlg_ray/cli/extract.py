"""Stage 1: extract a learngene from the ancestor and write it as one safetensors file.

    python jobs/extract.py --config configs/local.yaml --out runs/lg.safetensors [--mode elastic] [--set k=v ...]

--mode fixed (default) trains the learngene through the paper's auxiliary model alone; --mode elastic
also distils, at every step, descendant shapes of descendants.grid (its depths x widths: the largest,
the smallest and random ones, learngene.extraction.elastic_shapes in all, weighted by
learngene.extraction.elastic_weight), so that every size the grid asks for starts from weights trained
at that size. Both write the same tensors.

With --backend ray (the default) the extraction runs on Ray Train with
DeepSpeed ZeRO (workers, stage, offload from the `ray:` config section); --backend local runs it
in this process. --out may be a URI (s3://bucket/lg.safetensors). Ray Train state (ZeRO
checkpoints) goes to ray.storage_path, else beside the file (LG.ray/, a URI too); running the same
command again resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from mmlg_ray.cli import ArgumentParser, add_config_args, config_from_args
from mmlg_ray.errors import exits_cleanly


@exits_cleanly
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", required=True, help="learngene file to write (.safetensors; a path or a URI)")
    p.add_argument("--method", choices=["mmlg", "tleg"], default=None, help="default: learngene.method")
    p.add_argument(
        "--mode",
        choices=["fixed", "elastic"],
        default="fixed",
        help="fixed: the auxiliary model's shape only (the paper); elastic: also the grid's shapes",
    )
    p.add_argument("--backend", choices=["local", "ray"], default="ray")
    a = p.parse_args(argv)
    cfg = config_from_args(a)
    from mmlg_ray.engine import preflight

    preflight.extract(cfg, a.out, backend=a.backend)  # before Ray starts or anything is written
    from mmlg_ray.method.ancestor import get_ancestor
    from mmlg_ray.engine.pipeline import extract, setup_runtime

    setup_runtime(cfg)
    anc = get_ancestor(cfg)
    if a.backend == "ray":
        from mmlg_ray.distributed.extract import extract_on_ray

        cost = extract_on_ray(cfg, anc, a.out, method=a.method, mode=a.mode)
    else:
        from mmlg_ray import storage

        with storage.writing(a.out) as local:  # a URI: written here, uploaded once complete
            cost = extract(cfg, anc, local, method=a.method, mode=a.mode)
    print(
        f"wrote {a.out} ({a.mode}): {cost['steps']} steps, {cost['samples']} samples, {cost['flops']:.3g} FLOPs, "
        f"{cost['device_s']:.1f} device-s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
