"""What the driver holds and what each trial and pre-training task reads, at a config's scale, for
three generations of the sweep engine.

    .venv/bin/python benchmarks/trial_fetch.py [--config configs/paper_vitb16.yaml]

v1 (one `tune.with_parameters` object): every trial fetched the ancestor, every learngene and every
pre-trained shape. v2 (stop 16): each artifact put into the object store once by the driver, which
first fetched every pre-trained state back from its task; each pt_ft / csm task was given the
ancestor. v3, now (artifacts by reference, mmlg_ray.engine.artifacts / mmlg_ray.engine.job.trial_inputs): every
stage writes its artifact to the output store and hands on a URI + sha256; a pre-training task
writes its own shape; a trial reads only its cell's artifact, through a node-local cache keyed by
the hash (downloaded once per node, loaded once per worker process); nothing passes through the
driver. Sizes are fp32 bytes of the tensors (analytic, from the config's shapes: the learngene's own
tensor shapes plus the ancestor's non-layer tensors it carries)."""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter


from mmlg_ray import cost
from mmlg_ray.config import load_config
from mmlg_ray.method.descend import descendant_spec
from mmlg_ray.method.learngene import Learngene, LearngeneMeta
from mmlg_ray.engine.pipeline import arm_name, aux_spec, cells, learngene_arms, needs_pretraining, shape_key

GB = 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/paper_vitb16.yaml")
    a = p.parse_args(argv)
    cfg = load_config(a.config, [])
    anc = cfg.ancestor.spec
    anc_b = cost.model_params(anc) * 4
    inherited_b = anc_b - sum(cost.tower_params(anc, t, layers_only=True) for t in ("image", "text")) * 4
    lg_b = {}
    for m, mode in learngene_arms(cfg):  # one learngene per method and extraction mode
        meta = LearngeneMeta(
            method=m,
            schedule=cfg.learngene.schedule if m == "mmlg" else "tleg",
            spec=aux_spec(cfg, anc).model_dump(),
            knots=cfg.learngene.learned_knots,
        )
        lg_b[arm_name(m, mode)] = sum(math.prod(s) for s in Learngene.tensor_shapes(meta).values()) * 4 + inherited_b
    pre_b = {(m, shape_key(s), b): cost.model_params(s) * 4 for m, s, b in needs_pretraining(cfg, anc)}
    everything = anc_b + sum(lg_b.values()) + sum(pre_b.values())
    per_cell = cfg.ray.tune.num_samples + max(0, len(cfg.descendants.seeds) - 1)
    after = Counter()
    n = Counter()
    for c in cells(cfg):
        if c.method in ("weight_selection", "heur_lg"):
            b = anc_b
        elif c.learngene_key in lg_b:
            b = lg_b[c.learngene_key]
        elif c.method in ("pt_ft", "csm"):
            b = pre_b[(c.method, shape_key(descendant_spec(anc, c.depth, c.width)), c.pt_budget)]
        else:
            b = 0
        after[c.method] = max(after[c.method], b)
        n[c.method] += per_cell
    print(
        f"config {a.config}: {sum(n.values())} trials; ancestor {anc_b / GB:.2f} GB, "
        + ", ".join(f"{m} learngene {b / GB:.3f} GB" for m, b in lg_b.items())
        + f", {len(pre_b)} pre-trained shapes {sum(pre_b.values()) / GB:.2f} GB"
    )
    n_csm = sum(1 for k in pre_b if k[0] == "csm")
    lg_max = max(lg_b.values(), default=0)
    print("\nthe driver holds (peak, GB):")
    print(f"  v1 {everything / GB:7.2f}  ancestor + every learngene + every pre-trained state, in one object")
    print(f"  v2 {everything / GB:7.2f}  the same, fetched back from the tasks and put once each")
    print(
        f"  v3 {(anc_b + lg_max) / GB:7.2f}  the ancestor (extraction's teacher) and the one learngene it "
        "consolidates; no pre-trained state ever"
    )
    print("\npre-training tasks read (GB, all tasks):")
    print(f"  v1/v2 {len(pre_b) * anc_b / GB:7.2f}  the ancestor, every task ({len(pre_b)} tasks)")
    print(f"  v3    {n_csm * anc_b / GB:7.2f}  the ancestor, csm tasks only ({n_csm}); pt_ft reads nothing")
    print(
        "\neach trial reads (largest, by method; v2 and v3 alike, v3 from the output store through the "
        "node-local cache):"
    )
    total = 0
    for m in n:
        print(f"  {m:<17} {after[m] / GB:7.3f} GB  x {n[m]} trials")
        total += after[m] * n[m]
    print(
        f"  v1: {sum(n.values()) * everything / 1e12:.1f} TB over the sweep; v2/v3: at most {total / 1e12:.2f} TB "
        "(v3: each artifact downloaded once per node, loaded once per worker process)"
    )
    print(
        f"\nwhat travels through the object store: v2 {everything / GB:.2f} GB of artifacts; v3 the trial "
        "context (references, a few kB) and the extraction's ancestor for its Train workers"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
