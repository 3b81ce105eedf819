"""Stage artifacts passed by reference: a URI (or a path every node reads) plus a content hash.

A stage writes its artifact to the output store (a folder or a bucket) and hands on an `ArtifactRef`;
a consumer (a trial, a pre-training task) reads it through a node-local cache keyed by the hash, so
a node downloads each artifact once, a reused worker process loads it once, and nothing travels
through the driver. No Ray here: the Ray layer only passes the small references around."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from mmlg_ray import storage as stor
from mmlg_ray.atomic import atomic_path

_LOADED: dict = {}  # (kind, sha256) -> the loaded object, per process (a reused trial actor keeps it)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ArtifactRef:
    uri: str  # a URI (s3://...) or a local path
    sha256: str  # of the file's bytes

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, d: dict | "ArtifactRef") -> "ArtifactRef":
        return d if isinstance(d, ArtifactRef) else cls(str(d["uri"]), str(d["sha256"]))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def ref_to(uri: str, local_copy=None) -> ArtifactRef:
    """The reference of an artifact at `uri`, hashed from `local_copy` (its staged copy) or read."""
    if local_copy is not None:
        return ArtifactRef(str(uri), file_sha256(local_copy))
    with stor.reading(uri) as p:
        return ArtifactRef(str(uri), file_sha256(p))


def local_path(ref: ArtifactRef, cache_dir) -> Path:
    """A local file holding the artifact: itself for a local path (read in place, not hashed again);
    else the node-local cache's copy (cache_dir/artifacts/<sha256><suffix>), downloaded once per node
    (a file lock keeps concurrent trials to one download) and checked against its hash. Nothing evicts
    the cache: it holds what the sweep's cells read, each once."""
    ref = ArtifactRef.of(ref)
    if not stor.is_uri(ref.uri):
        p = Path(os.path.expanduser(ref.uri))
        if not p.is_file():  # e.g. a node-local output folder read on another node
            import socket

            raise FileNotFoundError(
                f"{p} is not on this node ({socket.gethostname()}): a local output folder must "
                "be one every node mounts (ray.storage_shared=true), or put the output on "
                "s3://..."
            )
        return p
    suffix = "".join(Path(ref.uri.rstrip("/").rsplit("/", 1)[-1]).suffixes[-1:])
    dest = Path(os.path.expanduser(str(cache_dir))) / "artifacts" / f"{ref.sha256}{suffix}"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(dest) + ".lock"):  # concurrent trials on one node: one download
        if dest.is_file():
            return dest
        with atomic_path(dest) as tmp:
            stor.download(ref.uri, tmp)
            got = file_sha256(tmp)
            if got != ref.sha256:
                raise RuntimeError(
                    f"{ref.uri} changed since it was written: sha256 {got[:12]}, expected "
                    f"{ref.sha256[:12]}; rerun the stage that writes it (--fresh)"
                )
    return dest


def load(ref, kind: str, loader, cache_dir):
    """`loader(local path)` of the artifact, once per process and content hash."""
    ref = ArtifactRef.of(ref)
    key = (kind, ref.sha256)
    with _LOCK:
        if key not in _LOADED:
            if len(_LOADED) >= 4:  # a reused actor keeps the last few; artifacts can be GBs
                _LOADED.clear()
            _LOADED[key] = loader(local_path(ref, cache_dir))
        return _LOADED[key]


def write_sidecar(uri: str, data: dict) -> None:
    """A small JSON file beside an artifact (its cost and reference), written last: a reader that
    sees it knows the artifact is complete."""
    with stor.writing(uri) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True, default=float))


def read_sidecar(uri: str) -> dict | None:
    try:
        if not stor.exists(uri):
            return None
        return json.loads(stor.read_text(uri))
    except (FileNotFoundError, OSError):
        return None
