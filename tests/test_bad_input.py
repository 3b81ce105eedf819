"""Bad input, each kind tested through the job's own main(argv), in-process: exit code 2, exactly one
line on stderr naming the field and the fix, nothing written (the output folder is never created; the
test's folder holds exactly what the case put there), and neither Ray nor any training started."""

import json
import os
import struct
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from jobs import descend as descend_job
from jobs import extract as extract_job
from jobs import rehearse as rehearse_job
from jobs import report as report_job
from jobs import sweep as sweep_job
from mmlg_ray.engine import preflight
from mmlg_ray.config import load_config
from mmlg_ray.method.models import build_model

SMALL = [
    "ancestor.spec.image_depth=1",
    "ancestor.spec.text_depth=1",
    "ancestor.spec.image_width=128",
    "ancestor.spec.text_width=64",
    "ancestor.spec.embed_dim=32",
    "ancestor.spec.image_size=16",
    "ancestor.spec.patch_size=8",
    "ancestor.spec.context_length=16",
]


# --------------------------------------------------------------------------- files the cases read
def text(path, body="these are not weights\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def random_bytes(path, n=4096):
    path.write_bytes(os.urandom(n))
    return path


def small_state():
    spec = load_config(None, SMALL).ancestor.spec
    return {k: v.contiguous() for k, v in build_model(spec).state_dict().items() if k != "attn_mask"}


def weights_of_another_arch(path):
    save_file({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "logit_scale": torch.zeros(())}, str(path))
    return path


def truncated_weights(path):
    save_file(small_state(), str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    return path


def fake_learngene(path, meta=True):
    save_file(
        {"multimodal.ln_1.weight": torch.ones(4)},
        str(path),
        metadata={"mmlg_ray": json.dumps({"format_version": 1})} if meta else None,
    )
    return path


def finished_sweep(d, trials=True, report_file=False, bad_parquet=False):
    import pandas as pd

    d.mkdir()
    if trials:
        if bad_parquet:
            text(d / "trials.parquet", "trial,score\nx,1\n")
        else:
            pd.DataFrame({"trial": ["a"], "final_score": [0.5]}).to_parquet(d / "trials.parquet")
        pd.DataFrame({"stage": ["ancestor"], "steps": [1]}).to_parquet(d / "stages.parquet")
    if report_file:
        text(d / "report")
    return d


# --------------------------------------------------------------------------- the cases
# (id, job, argv builder t -> list (t: the test's folder, files made there), the field the line must name)
S = "--set"
CASES = [
    # the rehearsal's preemptions
    (
        "rehearse-preempt-mode",
        "rehearse",
        lambda t: ["--output", str(t / "r"), "--preempt", "drain,reboot"],
        "--preempt",
    ),
    ("rehearse-negative-notice", "rehearse", lambda t: ["--output", str(t / "r"), "--notice-s", "-1"], "--notice-s"),
    # the cases
    ("negative-width", "sweep", lambda t: [S, "descendants.grid.width=[-64]"], "descendants.grid.width"),
    ("empty-seed-list", "sweep", lambda t: [S, "descendants.seeds=[]"], "descendants.seeds"),
    ("negative-finetune-steps", "sweep", lambda t: [S, "descendants.finetune.steps=-1"], "descendants.finetune.steps"),
    (
        "negative-extraction-steps",
        "sweep",
        lambda t: [S, "learngene.extraction.steps=-5"],
        "learngene.extraction.steps",
    ),
    ("zero-pretrain-steps", "sweep", lambda t: [S, "ancestor.pretrain.steps=0"], "ancestor.pretrain.steps"),
    ("output-under-a-file", "sweep", lambda t: ["--output", str(text(t / "f") / "out")], "--output"),
    ("output-is-a-file", "sweep", lambda t: ["--output", str(text(t / "f"))], "--output"),
    ("output-on-read-only-fs", "sweep", lambda t: ["--output", "/proc/mmlg-bad-input/out"], "--output"),
    (
        "output-dir-under-a-file",
        "sweep",
        lambda t: ["--output", None, S, f"output_dir={text(t / 'f')}/run"],
        "output_dir",
    ),
    ("storage-path-under-a-file", "sweep", lambda t: [S, f"ray.storage_path={text(t / 'f')}/ray"], "ray.storage_path"),
    ("cache-dir-under-a-file", "sweep", lambda t: [S, f"cache_dir={text(t / 'f')}/cache"], "cache_dir"),
    (
        "bucket-output-staged-under-a-file",
        "sweep",
        lambda t: [
            "--output",
            "s3://bucket/run",
            S,
            "ancestor.source=" "checkpoint",
            S,
            f"ancestor.checkpoint={weights_of_another_arch(t / 'a.safetensors')}",
            S,
            "data.retrieval.kind=fashion_mnist",
            S,
            "data.text_classification.kind=fashion_mnist",
            S,
            f"cache_dir={text(t / 'f')}/cache",
        ],
        "cache_dir",
    ),
    (
        "checkpoint-text-as-safetensors",
        "sweep",
        lambda t: [S, "ancestor.source=checkpoint", S, f"ancestor.checkpoint={text(t / 'anc.safetensors')}"],
        "ancestor.checkpoint",
    ),
    (
        "checkpoint-random-bytes-safetensors",
        "sweep",
        lambda t: [S, "ancestor.source=checkpoint", S, f"ancestor.checkpoint={random_bytes(t / 'anc.safetensors')}"],
        "ancestor.checkpoint",
    ),
    (
        "checkpoint-text-as-pt",
        "sweep",
        lambda t: [S, "ancestor.source=checkpoint", S, f"ancestor.checkpoint={text(t / 'anc.pt')}"],
        "ancestor.checkpoint",
    ),
    (
        "checkpoint-random-bytes-pt",
        "sweep",
        lambda t: [S, "ancestor.source=checkpoint", S, f"ancestor.checkpoint={random_bytes(t / 'anc.pt')}"],
        "ancestor.checkpoint",
    ),
    (
        "checkpoint-truncated",
        "sweep",
        lambda t: [
            *sum(([S, s] for s in SMALL), []),
            S,
            "descendants.grid.width=[64]",
            S,
            "ancestor.source=checkpoint",
            S,
            f"ancestor.checkpoint={truncated_weights(t / 'anc.safetensors')}",
        ],
        "ancestor.checkpoint",
    ),
    (
        "checkpoint-of-another-architecture",
        "sweep",
        lambda t: [
            S,
            "ancestor.source=checkpoint",
            S,
            f"ancestor.checkpoint={weights_of_another_arch(t / 'anc.safetensors')}",
        ],
        "ancestor.checkpoint",
    ),
    (
        "checkpoint-missing",
        "sweep",
        lambda t: [S, "ancestor.source=checkpoint", S, f"ancestor.checkpoint={t}/nope.safetensors"],
        "ancestor.checkpoint",
    ),
    (
        "checkpoint-is-a-folder",
        "sweep",
        lambda t: [S, "ancestor.source=checkpoint", S, f"ancestor.checkpoint={t}"],
        "ancestor.checkpoint",
    ),
    ("checkpoint-not-given", "sweep", lambda t: [S, "ancestor.source=checkpoint"], "ancestor.checkpoint"),
    (
        "open-clip-unknown-tag",
        "sweep",
        lambda t: [
            S,
            "ancestor.source=open_clip",
            S,
            "ancestor.arch=ViT-B-16",
            S,
            "ancestor.pretrained=no-such-tag",
            S,
            "descendants.grid.width=[64]",
        ],
        "ancestor.pretrained",
    ),
    ("set-without-equals", "sweep", lambda t: [S, "learngene.schedule"], "--set"),
    ("set-unknown-key", "sweep", lambda t: [S, "learngene.shedule=convex"], "learngene.shedule"),
    ("set-wrong-type", "sweep", lambda t: [S, "seed=abc"], "seed"),
    ("set-scalar-for-list", "sweep", lambda t: [S, "descendants.grid.width=64"], "descendants.grid.width"),
    ("set-scalar-for-section", "sweep", lambda t: [S, "ancestor=5"], "ancestor"),
    ("config-file-missing", "sweep", lambda t: ["--config", str(t / "nope.yaml")], "--config"),
    ("config-file-not-yaml", "sweep", lambda t: ["--config", str(text(t / "c.yaml", "seed: [1, 2\n"))], "--config"),
    ("config-file-not-a-mapping", "sweep", lambda t: ["--config", str(text(t / "c.yaml", "- 1\n- 2\n"))], "--config"),
    ("config-unknown-preset", "sweep", lambda t: ["--config", "paper_vitb17"], "--config"),
    ("backend-not-a-choice", "sweep", lambda t: ["--backend", "slurm"], "--backend"),
    ("unknown-flag", "sweep", lambda t: ["--outptu", str(t / "x")], "--outptu"),
    ("duplicate-depths", "sweep", lambda t: [S, "descendants.grid.depth=[1, 2, 1]"], "descendants.grid.depth"),
    ("duplicate-seeds", "sweep", lambda t: [S, "descendants.seeds=[0, 0]"], "descendants.seeds"),
    ("negative-seed", "sweep", lambda t: [S, "seed=-1"], "seed"),
    ("empty-method-list", "sweep", lambda t: [S, "descendants.grid.method=[]"], "descendants.grid.method"),
    (
        "eval-every-beyond-steps",
        "sweep",
        lambda t: [S, "descendants.finetune.eval_every=41"],
        "descendants.finetune.eval_every",
    ),
    ("zero-batch-size", "sweep", lambda t: [S, "descendants.finetune.batch_size=0"], "descendants.finetune.batch_size"),
    ("negative-lr", "sweep", lambda t: [S, "learngene.extraction.lr=-0.001"], "learngene.extraction.lr"),
    ("lr-range-reversed", "sweep", lambda t: [S, "ray.tune.search_space.lr=[0.01, 0.001]"], "ray.tune.search_space.lr"),
    ("lr-range-from-zero", "sweep", lambda t: [S, "ray.tune.search_space.lr=[0, 0.001]"], "ray.tune.search_space.lr"),
    ("lr-range-one-value", "sweep", lambda t: [S, "ray.tune.search_space.lr=[0.001]"], "ray.tune.search_space.lr"),
    ("zero-samples", "sweep", lambda t: [S, "ray.tune.num_samples=0"], "ray.tune.num_samples"),
    ("zero-concurrency", "sweep", lambda t: [S, "ray.tune.max_concurrent=0"], "ray.tune.max_concurrent"),
    ("zero-workers", "sweep", lambda t: [S, "ray.num_workers=0"], "ray.num_workers"),
    ("negative-trial-cpus", "sweep", lambda t: [S, "ray.tune.trial_cpus=-1"], "ray.tune.trial_cpus"),
    (
        "zero-checkpoint-every",
        "sweep",
        lambda t: [S, "learngene.extraction.checkpoint_every=0"],
        "learngene.extraction.checkpoint_every",
    ),
    ("width-not-whole-heads", "sweep", lambda t: [S, "descendants.grid.width=[100]"], "descendants.grid.width"),
    ("width-beyond-ancestor", "sweep", lambda t: [S, "descendants.grid.width=[256]"], "descendants.grid.width"),
    ("streamed-set-without-path", "sweep", lambda t: [S, "data.corpus.kind=webdataset"], "data.corpus.path"),
    (
        "shard-pattern-matches-nothing",
        "sweep",
        lambda t: [S, "data.corpus.kind=webdataset", S, f"data.corpus.path={t}/shards-*.tar"],
        "data.corpus.path",
    ),
    ("data-path-missing", "sweep", lambda t: [S, f"data.retrieval.path={t}/no-such-stamps"], "data.retrieval.path"),
    (
        "csv-folder-without-captions",
        "sweep",
        lambda t: [S, "data.retrieval.kind=image_folder_csv", S, f"data.retrieval.path={t}"],
        "data.retrieval.path",
    ),
    (
        "classification-set-without-labels",
        "sweep",
        lambda t: [
            S,
            "data.image_classification.kind=image_folder_csv",
            S,
            f"data.image_classification.path={text(t / 'captions.csv', 'image,caption' + chr(10) + 'a.png,a cat').parent}",
        ],
        "data.image_classification",
    ),
    ("unknown-price-device", "sweep", lambda t: [S, "report.device=tpu9"], "report.device"),
    (
        "prices-file-not-a-table",
        "sweep",
        lambda t: [S, f"report.prices_file={text(t / 'p.yaml', 'a: 1')}"],
        "report.prices_file",
    ),
    ("fp16-on-cpu-workers", "sweep", lambda t: [S, "precision=fp16"], "precision"),
    # stage 1 alone
    ("extract-out-is-a-folder", "extract", lambda t: ["--out", str(t)], "--out"),
    ("extract-out-under-a-file", "extract", lambda t: ["--out", f"{text(t / 'f')}/lg.safetensors"], "--out"),
    (
        "extract-checkpoint-random-bytes",
        "extract",
        lambda t: [
            "--out",
            f"{t}/lg.safetensors",
            S,
            "ancestor.source=checkpoint",
            S,
            f"ancestor.checkpoint={random_bytes(t / 'anc.pt')}",
        ],
        "ancestor.checkpoint",
    ),
    (
        "extract-method-not-a-choice",
        "extract",
        lambda t: ["--out", f"{t}/lg.safetensors", "--method", "magic"],
        "--method",
    ),
    ("extract-out-missing", "extract", lambda t: [], "--out"),
    # one descendant
    (
        "descend-learngene-missing",
        "descend",
        lambda t: ["--learngene", f"{t}/lg.safetensors", "--modality", "image", "--out", f"{t}/d"],
        "--learngene",
    ),
    (
        "descend-learngene-is-text",
        "descend",
        lambda t: ["--learngene", str(text(t / "lg.safetensors")), "--modality", "image", "--out", f"{t}/d"],
        "--learngene",
    ),
    (
        "descend-learngene-plain-weights",
        "descend",
        lambda t: [
            "--learngene",
            str(fake_learngene(t / "lg.safetensors", meta=False)),
            "--modality",
            "image",
            "--out",
            f"{t}/d",
        ],
        "--learngene",
    ),
    (
        "descend-out-holds-other-files",
        "descend",
        lambda t: [
            "--learngene",
            str(fake_learngene(t / "lg.safetensors")),
            "--modality",
            "image",
            "--out",
            str(text(t / "mine" / "notes.txt").parent),
        ],
        "--out",
    ),
    (
        "descend-out-under-a-file",
        "descend",
        lambda t: [
            "--learngene",
            str(fake_learngene(t / "lg.safetensors")),
            "--modality",
            "image",
            "--out",
            f"{text(t / 'f')}/d",
        ],
        "--out",
    ),
    (
        "descend-negative-width",
        "descend",
        lambda t: [
            "--learngene",
            str(fake_learngene(t / "lg.safetensors")),
            "--modality",
            "image",
            "--width",
            "-64",
            "--out",
            f"{t}/d",
        ],
        "--width",
    ),
    (
        "descend-depth-not-a-number",
        "descend",
        lambda t: [
            "--learngene",
            str(fake_learngene(t / "lg.safetensors")),
            "--modality",
            "image",
            "--depth",
            "two",
            "--out",
            f"{t}/d",
        ],
        "--depth",
    ),
    (
        "descend-modality-not-a-choice",
        "descend",
        lambda t: ["--learngene", str(fake_learngene(t / "lg.safetensors")), "--modality", "audio", "--out", f"{t}/d"],
        "--modality",
    ),
    # the report of a finished sweep
    ("report-output-missing", "report", lambda t: [f"{t}/run"], "OUTPUT"),
    ("report-output-is-a-file", "report", lambda t: [str(text(t / "run"))], "OUTPUT"),
    ("report-no-trials", "report", lambda t: [str(finished_sweep(t / "run", trials=False))], "OUTPUT"),
    ("report-trials-not-parquet", "report", lambda t: [str(finished_sweep(t / "run", bad_parquet=True))], "OUTPUT"),
    ("report-folder-is-a-file", "report", lambda t: [str(finished_sweep(t / "run", report_file=True))], "OUTPUT"),
]
JOBS = {
    "sweep": sweep_job,
    "extract": extract_job,
    "descend": descend_job,
    "report": report_job,
    "rehearse": rehearse_job,
}


def _snapshot(root):
    """Every path under root with its size and mtime (a folder's own mtime left out: the writability
    probe of a folder makes and removes an entry in it)."""
    return {
        str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
        for p in root.rglob("*")
    }


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def test_at_least_30_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30
    jobs = [c[1] for c in CASES]
    assert jobs.count("sweep") >= 30 and min(jobs.count(j) for j in ("extract", "descend", "report")) >= 3


@pytest.fixture
def stop_past_the_checks(monkeypatch):
    """Input that gets past the checks fails the test at once instead of running a job: the first
    step of each job after its checks raises (setup_runtime starts the sweep and extraction)."""
    import mmlg_ray.method.descend
    import mmlg_ray.engine.pipeline
    import mmlg_ray.report.build

    def stop(*a, **k):
        raise RuntimeError("bad input got past the checks")

    monkeypatch.setattr(mmlg_ray.engine.pipeline, "setup_runtime", stop)
    monkeypatch.setattr(mmlg_ray.method.descend, "init_descendant", stop)
    monkeypatch.setattr(mmlg_ray.report.build, "build_report", stop)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the open_clip case must not wait on the network


@pytest.mark.parametrize("name, job, argv, field", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    name, job, argv, field, tmp_path, capsys, stop_past_the_checks
):
    case = tmp_path / "case"
    case.mkdir()
    args = argv(case)
    out = tmp_path / "out"
    if job in ("sweep", "extract"):  # first, so that a case's own cache_dir wins
        args = [S, f"cache_dir={tmp_path / 'cache'}"] + args
    if job == "sweep":  # the job's default backend (ray): nothing may start it
        if "--output" not in args:
            args = ["--output", str(out)] + args
        elif None in args:  # the case names output_dir through the config instead
            i = args.index("--output")
            args = args[:i] + args[i + 2 :]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = JOBS[job].main(args)
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and field in lines[0] and "(fix: " in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # no output folder, no temp file, no cache entry
    assert not out.exists()
    assert not _ray_started()
    assert took < 20, f"{name} took {took:.1f} s"  # imports (open_clip) on first use; a check itself is instant


# --------------------------------------------------------------------------- good input passes the checks
def test_good_input_passes_the_checks_and_writes_nothing(tmp_path):
    state = small_state()
    save_file(state, str(tmp_path / "anc.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "anc.pt")
    before = _snapshot(tmp_path)
    for ckpt in ("anc.safetensors", "anc.pt"):
        cfg = load_config(
            None,
            SMALL
            + [
                "descendants.grid.width=[64]",
                "ancestor.source=checkpoint",
                f"ancestor.checkpoint={tmp_path / ckpt}",
                f"cache_dir={tmp_path / 'c'}",
            ],
        )
        preflight.sweep(cfg, tmp_path / "out" / "run", backend="ray")
        preflight.extract(cfg, tmp_path / "lg" / "lg.safetensors", backend="local")
    cfg = load_config(None, [f"cache_dir={tmp_path / 'cache'}"])  # the embedded default, packaged data
    preflight.sweep(cfg, tmp_path / "run")
    fake_learngene(tmp_path / "lg.safetensors")
    before["lg.safetensors"] = _snapshot(tmp_path)["lg.safetensors"]
    preflight.descend(str(tmp_path / "lg.safetensors"), tmp_path / "d")
    assert _snapshot(tmp_path) == before


def test_a_real_run_of_the_cli_is_one_line(tmp_path):
    """As a user runs it: a subprocess, warnings and all."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "jobs", "sweep.py"),
            "--set",
            "descendants.grid.width=[-64]",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: descendants.grid.width") and not (tmp_path / "out").exists()


def test_safetensors_header_reader_refuses_what_is_not_weights(tmp_path):
    """The byte-level cases of the header check, next to a real file it must accept."""
    save_file({"a": torch.zeros(3, 2)}, str(tmp_path / "ok.safetensors"))
    assert preflight.safetensors_header(str(tmp_path / "ok.safetensors"), "f", "x")["a"]["shape"] == [3, 2]
    header = json.dumps({"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]}}).encode()
    bad = {
        "empty": b"",
        "huge-header-length": struct.pack("<Q", 2**40) + b"{}",
        "header-not-json": struct.pack("<Q", 4) + b"\xff\xfe\x00\x01",
        "no-tensors": struct.pack("<Q", 2) + b"{}",
        "data-cut-short": struct.pack("<Q", len(header)) + header + b"\x00" * 10,
    }
    for name, blob in bad.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
        with pytest.raises(preflight.UserError, match="^field: ") as e:
            preflight.safetensors_header(str(tmp_path / f"{name}.safetensors"), "field", "x")
        assert "fix: x" in str(e.value), name


def test_a_permission_error_mid_run_is_one_line_too(capsys):
    """What no check up front can foresee (a folder made read-only while the job runs, a full disk)
    still ends as one line and exit code 2; other OS errors stay tracebacks (they are bugs)."""
    import errno

    from mmlg_ray.errors import exits_cleanly

    @exits_cleanly
    def job(argv=None):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/run/trials.parquet")

    assert job([]) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and line.startswith("error: /data/run/trials.parquet: Permission denied (fix: ")

    @exits_cleanly
    def buggy(argv=None):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")

    with pytest.raises(FileNotFoundError):
        buggy([])
