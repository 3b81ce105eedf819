"""Mixed precision in the core (no Ray): autocast and loss scaling in TorchEngine / run_loop, every
training stage and evaluation in bf16 with fp32 master weights, and DeepSpeed's offloaded optimizer
keeping the project's schedule and weight-decay exclusions (one process, no Ray)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmlg_ray.method import precision as amp
from mmlg_ray.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


class LinearTrace:
    """A global forward hook on every nn.Linear: (module id, training, autocast on, output dtype)."""

    def __enter__(self):
        self.calls = []

        def hook(mod, args, out):
            if isinstance(mod, nn.Linear) and torch.is_tensor(out):
                self.calls.append((id(mod), mod.training, torch.is_autocast_enabled("cpu"), out.dtype))

        self.handle = nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def all_in(self, dtype, training=None):
        calls = [c for c in self.calls if training is None or c[1] == training]
        return bool(calls) and all(c[2] and c[3] == dtype for c in calls)


def test_autocast_scaler_and_fp32_losses():
    with amp.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with amp.autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        y = nn.Linear(4, 4)(torch.randn(2, 4))
        assert y.dtype == torch.bfloat16
        from mmlg_ray.method.train import clip_loss

        img, txt = (nn.functional.normalize(torch.randn(8, 16), dim=-1) for _ in range(2))
        loss = clip_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(10.0))
    assert loss.dtype == torch.float32  # losses are formed in fp32 even under autocast
    torch.testing.assert_close(loss, clip_loss(img.bfloat16().float(), txt.bfloat16().float(), torch.tensor(10.0)))
    assert [amp.grad_scaler("cpu", p).is_enabled() for p in amp.PRECISIONS] == [False, False, True]
    if not torch.cuda.is_available():
        assert amp.set_tf32(True) is False  # a CUDA-only switch


def test_fp16_loss_scaling_skips_an_overflowing_step():
    if not amp.autocast_supported("cpu", "fp16"):
        pytest.skip(f"torch {torch.__version__} has no fp16 autocast on CPU")
    from mmlg_ray.method.train import TorchEngine, run_loop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    eng = TorchEngine(model, TrainConfig(steps=4, lr=1e-2, warmup_steps=0, weight_decay=0.0), precision="fp16")
    seen = []

    def loss_fn(batch):
        (x,) = batch
        out = model(x)
        seen.append(out.dtype)
        return out.float().pow(2).mean(), {}

    scale0 = eng.scaler.get_scale()
    w0 = model[0].weight.detach().clone()
    run_loop(eng, iter([(torch.randn(32, 8),)] * 2), loss_fn, 2, log_every=10)
    assert seen == [torch.float16, torch.float16] and model[0].weight.dtype == torch.float32
    assert not torch.equal(model[0].weight, w0) and eng.scaler.get_scale() == scale0
    # an overflowing step (inf gradients) is skipped and the scale is lowered
    w1 = model[0].weight.detach().clone()
    run_loop(
        eng,
        iter([(torch.full((32, 8), 6e4),)]),
        lambda b: (model(b[0]).float().pow(2).mean() * 1e30, {}),
        3,
        start_step=2,
        log_every=10,
    )
    assert torch.equal(model[0].weight, w1) and eng.scaler.get_scale() < scale0
    assert "scaler" in eng.state_dict()


def test_bf16_finetune_runs_in_bf16_with_fp32_weights(tiny_cfg, tiny_ancestor):
    from mmlg_ray.method.descend import descendant_spec, init_descendant
    from mmlg_ray.method.finetune import finetune, load_task_data

    spec = descendant_spec(tiny_ancestor.spec, 2, 64)
    model = init_descendant(
        "weight_selection", "image", spec, ancestor_state=tiny_ancestor.state, ancestor_spec=tiny_ancestor.spec
    )
    data = load_task_data(tiny_cfg, "image", spec.image_size)
    fcfg = tiny_cfg.descendants.finetune.model_copy(update={"steps": 20, "eval_every": 10, "lr": 2e-3})
    with LinearTrace() as trace:
        out = finetune(model, "image", data, fcfg, spec, torch.device("cpu"), precision="bf16")
    assert trace.all_in(torch.bfloat16, training=True)  # fine-tuning forwards ran under bf16 autocast
    assert trace.all_in(torch.bfloat16, training=False)  # and so did the linear probe's features and evaluation
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    hist = out["history"]
    assert all(math.isfinite(h["train_loss"]) and 0 <= h["top1"] <= 100 for h in hist)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] and math.isfinite(out["linear_probe_init"])


def test_pretraining_csm_and_extraction_in_bf16(tiny_cfg, tiny_ancestor, tmp_path):
    from safetensors import safe_open

    from mmlg_ray.method.descend import descendant_spec
    from mmlg_ray.engine.pipeline import corpus, extract, pretrain_descendant

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.precision = "bf16"
    cfg.descendants.pretrain_steps = 3
    cfg.learngene.extraction.steps = 3
    data = corpus(cfg)
    spec = descendant_spec(tiny_ancestor.spec, 1, 64)
    student_linears = 2 * (spec.image_depth + spec.text_depth)  # mlp.c_fc + mlp.c_proj per block
    for method in ("pt_ft", "csm"):
        with LinearTrace() as trace:
            state, cost = pretrain_descendant(cfg, tiny_ancestor, method, spec, torch.device("cpu"), data=data)
        assert trace.all_in(torch.bfloat16), method
        if method == "csm":  # the teacher's forwards were traced (and in bf16) as well as the student's
            assert len({c[0] for c in trace.calls}) > student_linears
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
        assert math.isfinite(cost["final_loss"]) and cost["precision"] == "bf16"
    out = tmp_path / "lg.safetensors"
    with LinearTrace() as trace:
        cost = extract(cfg, tiny_ancestor, out, device=torch.device("cpu"), data=data)
    assert trace.all_in(torch.bfloat16) and math.isfinite(cost["final_loss"])
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_fp32_default_is_plain_pytorch(tiny_cfg):
    """precision=fp32 (the default) adds nothing: no autocast, no scaling, the same numbers as a bare
    AdamW + LambdaLR + clipping loop (what TorchEngine was before mixed precision)."""
    from mmlg_ray.method.train import TorchEngine, lr_lambda, param_groups, run_loop

    assert tiny_cfg.precision == "fp32"
    tcfg = TrainConfig(steps=3, lr=1e-2, warmup_steps=1)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 8, generator=g) for _ in range(3)]

    def model_():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))

    a, flags = model_(), []
    eng = TorchEngine(a, tcfg)

    def loss_fn(b):
        flags.append(torch.is_autocast_enabled("cpu"))
        return a(b[0]).pow(2).mean(), {}

    run_loop(eng, iter([(x,) for x in xs]), loss_fn, 3, log_every=10)

    b = model_()
    opt = torch.optim.AdamW(param_groups(b, tcfg.weight_decay), lr=tcfg.lr, fused=True)  # train.adamw: fused on CPU
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg))
    for x in xs:
        b(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    assert flags == [False] * 3 and not eng.scaler.is_enabled()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


_DS_SCRIPT = r"""
import json, os, sys
import torch
import deepspeed
from mmlg_ray.method.ancestor import Ancestor
from mmlg_ray.config import load_config
from mmlg_ray.distributed.extract import make_engine
from mmlg_ray.method.learngene import state_fingerprint
from mmlg_ray.method.models import build_model
from mmlg_ray.engine.pipeline import build_aux
from mmlg_ray.method.train import contrastive_step, lr_lambda, param_groups, run_loop

deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
sets = json.loads(sys.argv[1])
out = []
for stage, extra in ((2, []), (3, ["ray.extraction.offload_params=true"])):
    cfg = load_config(None, sets + [f"ray.extraction.zero_stage={stage}", "ray.extraction.offload_optimizer=true"]
                      + extra)
    torch.manual_seed(0)
    spec = cfg.ancestor.spec
    state = {k: v for k, v in build_model(spec).state_dict().items() if k != "attn_mask"}
    aux = build_aux(cfg, Ancestor(spec, state, state_fingerprint(state), "random"), fit=False)
    n_groups = [len(g["params"]) for g in param_groups(aux, cfg.learngene.extraction.weight_decay)]
    engine, _ = make_engine(cfg, aux, 1)
    steps = cfg.learngene.extraction.steps
    g = torch.Generator().manual_seed(0)
    batches = iter([(torch.randn(8, 3, spec.image_size, spec.image_size, generator=g).bfloat16(),
                     torch.randint(1, 400, (8, spec.context_length), generator=g), None) for _ in range(steps)])
    res = run_loop(engine, batches, contrastive_step(engine), steps, log_every=steps)
    out.append({"stage": stage, "optimizer": type(engine.basic_optimizer).__name__,
                "lr": engine.get_lr(),
                "expected_lr": cfg.learngene.extraction.lr * lr_lambda(cfg.learngene.extraction)(steps),
                "weight_decay": [g["weight_decay"] for g in engine.optimizer.param_groups],
                "n_groups": n_groups, "loss": float(res.last["loss"]),
                "dtype": str(next(engine.module.parameters()).dtype)})
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # over 10 s
def test_deepspeed_offload_keeps_schedule_and_weight_decay_exclusions(tiny_overrides):
    """ZeRO-2 and ZeRO-3 with the optimizer (and, for ZeRO-3, the parameters) offloaded to the CPU:
    DeepSpeed's CPU Adam runs over the project's two parameter groups (no weight decay on norms,
    biases, embeddings, logit scale) with the warm-up + cosine schedule, in bf16."""
    sets = tiny_overrides + [
        "precision=bf16",
        "learngene.extraction.steps=4",
        "learngene.extraction.warmup_steps=2",
        "learngene.extraction.lr=0.001",
        "learngene.extraction.weight_decay=0.1",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "2",
    }
    r = subprocess.run(
        [sys.executable, "-c", _DS_SCRIPT, json.dumps(sets)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        cwd=ROOT,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-4000:]
    results = json.loads(lines[0][len("RESULT ") :])
    assert [x["stage"] for x in results] == [2, 3]
    for x in results:
        assert x["optimizer"] == "DeepSpeedCPUAdam", x
        assert x["dtype"] == "torch.bfloat16"
        assert x["lr"] == pytest.approx([x["expected_lr"]] * 2), x  # both groups follow lr_lambda
        assert x["weight_decay"] == [0.1, 0.0], x
        assert min(x["n_groups"]) > 0 and math.isfinite(x["loss"])


def test_fp16_extraction_on_cpu_workers_is_refused_up_front(tmp_path):
    from mmlg_ray.config import load_config
    from mmlg_ray.distributed.extract import check_precision
    from mmlg_ray.errors import UserError

    with pytest.raises(UserError) as e:
        check_precision(load_config(None, ["precision=fp16"]))
    assert str(e.value).startswith("precision") and "bf16" in str(e.value)
    check_precision(load_config(None, ["precision=fp16", "ray.use_gpu=true"]))
    check_precision(load_config(None, ["precision=bf16"]))
    from jobs import sweep as sweep_job

    assert sweep_job.main(["--set", "precision=fp16", "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
