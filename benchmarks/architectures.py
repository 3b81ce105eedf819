"""Every architecture open_clip lists, as the ancestor: supported (and the embedding error against
open_clip on the same weights) or refused (with the one-line error naming the feature).

    .venv/bin/python benchmarks/architectures.py [--layers 2] [--full ViT-B-32-quickgelu ...]

--layers builds every tower at reduced depth (memory); --full names architectures to build at full
depth through open_clip.create_model itself.
"""

from __future__ import annotations

import argparse
import sys


import open_clip
import torch

from mmlg_ray.method.archcheck import compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--full", nargs="*", default=["ViT-B-32-quickgelu", "ViT-B-16", "ViT-M-16-alt"])
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    refused = []
    print(f"{'architecture':28s} {'depth':>7s} {'params':>13s} {'image rel err':>14s} {'text rel err':>13s}")
    for arch in open_clip.list_models():
        r = compare(arch, None if arch in a.full else a.layers)
        if not r["supported"]:
            refused.append(r)
            continue
        print(
            f"{arch:28s} {r['image_depth']:>3d}/{r['text_depth']:<3d} {r['params']:>13,d} "
            f"{r['image_rel_err']:>14.2e} {r['text_rel_err']:>13.2e}",
            flush=True,
        )
    print(f"\nrefused ({len(refused)}):")
    for r in refused:
        print(f"  {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
