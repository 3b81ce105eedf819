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

import sys

from mmlg_ray.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())
