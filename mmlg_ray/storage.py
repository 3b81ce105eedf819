"""Local folders and object-store URIs (s3://, gs://, ...) behind one small interface, over pyarrow.fs.

A URI is anything with a scheme (`s3://bucket/prefix`); everything else is a local path. S3 reads the
usual AWS settings: credentials from the environment, ~/.aws or an instance profile, the region from
AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for an S3-compatible store (MinIO, R2, a test server).
Ray Train and Ray Tune open their storage_path with the same pyarrow file systems, so one setting
reaches the driver and every Ray worker alike.

`OutputDir` is a run's output folder. A local one is the folder itself. A URI gets a local staging
folder (under the cache directory): every artifact is written there atomically, as before, and then
uploaded; an object-store PUT is atomic (an object appears whole or not at all), so a reader of the
bucket never sees half a file. On a rerun, what the URI already holds is looked up there and downloaded
on demand: the object store is the truth, the staging folder only a cache of it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from mmlg_ray.atomic import atomic_path


def is_uri(path) -> bool:
    return "://" in str(path)


def join(base, *parts: str) -> str:
    """`base/part/...` for a URI or a local path (a local base keeps its own spelling)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/")] + [str(p).strip("/") for p in parts if str(p)])
    return str(Path(base, *parts))


def filesystem(path):
    """(pyarrow FileSystem, path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(str(path))
        return fs, inner.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(os.path.expanduser(str(path))).resolve())


def _info(path):
    fs, p = filesystem(path)
    return fs, p, fs.get_file_info(p)


def exists(path) -> bool:
    """A file, or a folder (on an object store: any object under the prefix)."""
    import pyarrow.fs as pafs

    return _info(path)[2].type != pafs.FileType.NotFound


def is_file(path) -> bool:
    import pyarrow.fs as pafs

    return _info(path)[2].type == pafs.FileType.File


def remove(path) -> None:
    """Delete a folder (every object under a prefix) or a file; nothing there is no error."""
    import pyarrow.fs as pafs

    fs, p, info = _info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def list_files(path, pattern: str | None = None, recursive: bool = True) -> list[str]:
    """Files under a folder or prefix, as paths relative to it (sorted), optionally matching a glob
    `pattern` on the relative path. A missing folder holds none."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    rel = sorted(i.path[len(p) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)
    return [r for r in rel if pattern is None or fnmatch.fnmatch(r, pattern)]


def read_bytes(path) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode()


def upload(local, uri) -> None:
    """Copy a local file, or every file of a local folder, to `uri` (objects appear whole). A folder's
    objects at `uri` that the local folder no longer holds are removed afterwards."""
    local = Path(local)
    fs, p = filesystem(uri)
    if local.is_dir():
        names = sorted(str(f.relative_to(local)) for f in local.rglob("*") if f.is_file())
        for name in names:
            _put(local / name, fs, f"{p}/{name}")
        for stale in set(list_files(uri)) - set(names):
            fs.delete_file(f"{p}/{stale}")
        return
    _put(local, fs, p)


def _put(local: Path, fs, p: str) -> None:
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_path(p) as tmp:
            shutil.copyfile(local, tmp)
        return
    pafs.copy_files(str(local), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(uri, local) -> Path:
    """Copy the file at `uri` to the local path `local`, atomically; its modification time is the
    object's, so a later `OutputDir.fetch` can tell an unchanged copy from a stale one."""
    import pyarrow.fs as pafs

    fs, p, info = _info(uri)
    with atomic_path(local) as tmp:
        pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    if info.mtime_ns:
        os.utime(local, ns=(info.mtime_ns, info.mtime_ns))
    return Path(local)


@contextlib.contextmanager
def writing(target):
    """Yield a local path to write the file `target` (local path or URI) to; on success it is renamed
    onto `target`, or uploaded to it. Nothing appears at `target` if the block fails."""
    if not is_uri(target):
        with atomic_path(os.path.expanduser(str(target))) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="mmlg-upload-") as d:
        tmp = Path(d) / Path(str(target).rstrip("/")).name
        yield tmp
        upload(tmp, target)


@contextlib.contextmanager
def reading(source):
    """Yield a local path holding the file `source` (itself when local; a temporary copy of a URI)."""
    if not is_uri(source):
        yield Path(os.path.expanduser(str(source)))
        return
    with tempfile.TemporaryDirectory(prefix="mmlg-download-") as d:
        yield download(source, Path(d) / Path(str(source).rstrip("/")).name)


class OutputDir:
    """A run's output folder: a local folder, or a URI staged through a local folder.

    Writers write under `path(rel)` (atomically, as everywhere) and then call `push(rel)`; readers ask
    `fetch(rel)` for a local copy of what the output folder already holds. `uri(rel)` names a file
    where the user finds it (the URI, or the local path)."""

    def __init__(self, target, staging_root=None):
        self.target = str(target)
        self.remote = is_uri(target)
        if self.remote:
            root = (
                Path(os.path.expanduser(str(staging_root)))
                if staging_root
                else Path(tempfile.gettempdir()) / "mmlg_ray"
            )
            key = hashlib.sha256(self.target.rstrip("/").encode()).hexdigest()[:16]
            self.local = root / "outputs" / key
        else:  # absolute: trials read artifacts by this path from their own working folders
            self.local = Path(os.path.expanduser(self.target)).absolute()
            self.target = str(self.local)

    def __repr__(self):
        return f"OutputDir({self.target!r})"

    def __str__(self):
        return self.target

    def path(self, rel: str) -> Path:
        """The local path to write `rel` to (its folder is created)."""
        p = self.local / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def uri(self, rel: str = "") -> str:
        return join(self.target, rel) if self.remote else str(self.local / rel if rel else self.local)

    def exists(self, rel: str) -> bool:
        return exists(self.uri(rel)) if self.remote else (self.local / rel).exists()

    def fetch(self, rel: str) -> Path | None:
        """A local copy of the file `rel` if the output folder holds it, else None. For a URI the
        object store decides: a staged copy is reused only while it matches the object's size and time,
        and one whose object is gone is deleted."""
        local = self.local / rel
        if not self.remote:
            return local if local.is_file() else None
        import pyarrow.fs as pafs

        _, _, info = _info(self.uri(rel))
        if info.type != pafs.FileType.File:
            with contextlib.suppress(FileNotFoundError):
                local.unlink()
            return None
        if local.is_file():
            st = local.stat()
            if st.st_size == info.size and (not info.mtime_ns or st.st_mtime_ns == info.mtime_ns):
                return local
        return download(self.uri(rel), local)

    def read_text(self, rel: str) -> str | None:
        p = self.fetch(rel)
        return p.read_text() if p is not None else None

    def push(self, rel: str) -> str:
        """Upload the staged file or folder `rel` (nothing to do for a local output folder)."""
        if self.remote:
            upload(self.local / rel, self.uri(rel))
        return self.uri(rel)
