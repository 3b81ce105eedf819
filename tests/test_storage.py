"""mmlg_ray.storage against a real S3 server (moto's server mode on loopback, the session's `s3`
fixture) and the local disk: the same calls for both; objects listed through boto3."""

import time
import uuid

import pytest

from mmlg_ray import storage
from mmlg_ray.storage import OutputDir


@pytest.fixture
def prefix(s3):
    """A fresh prefix of the test bucket: (its URI, its key prefix)."""
    key = f"unit/{uuid.uuid4().hex[:8]}"
    return f"s3://{s3.bucket}/{key}", key


def test_join_and_is_uri(tmp_path):
    assert storage.is_uri("s3://b/x") and not storage.is_uri(tmp_path)
    assert storage.join("s3://b/run/", "ray", "search-1") == "s3://b/run/ray/search-1"
    assert storage.join(tmp_path, "a", "b.txt") == str(tmp_path / "a" / "b.txt")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_list_read_and_upload_a_folder(where, tmp_path, prefix, s3):
    base = str(tmp_path / "out") if where == "local" else prefix[0]
    assert not storage.exists(base) and storage.list_files(base) == []
    with storage.writing(storage.join(base, "a", "x.json")) as tmp:
        tmp.write_text('{"a": 1}')
    with pytest.raises(RuntimeError):  # a failed writer leaves nothing behind
        with storage.writing(storage.join(base, "a", "broken.json")) as tmp:
            tmp.write_text("{")
            raise RuntimeError("writer died")
    assert storage.is_file(storage.join(base, "a", "x.json")) and not storage.is_file(storage.join(base, "a"))
    assert storage.exists(storage.join(base, "a")) and not storage.exists(storage.join(base, "a", "broken.json"))
    assert storage.read_text(storage.join(base, "a", "x.json")) == '{"a": 1}'
    with storage.reading(storage.join(base, "a", "x.json")) as local:
        assert local.read_text() == '{"a": 1}'

    folder = tmp_path / "report"
    (folder / "img").mkdir(parents=True)
    (folder / "report.html").write_text("<html>1</html>")
    (folder / "img" / "p.png").write_bytes(b"\x89PNG")
    (folder / "old.png").write_bytes(b"old")
    storage.upload(folder, storage.join(base, "report"))
    (folder / "old.png").unlink()
    storage.upload(folder, storage.join(base, "report"))  # again, without old.png: it goes there too
    assert storage.list_files(storage.join(base, "report")) == ["img/p.png", "report.html"]
    assert storage.list_files(base, "*.json") == ["a/x.json"]
    assert storage.list_files(base, "*.json", recursive=False) == []
    storage.remove(storage.join(base, "a"))  # a folder: every object under the prefix (--fresh's Tune state)
    storage.remove(storage.join(base, "nothing-there"))
    assert not storage.exists(storage.join(base, "a")) and storage.exists(storage.join(base, "report"))
    if where == "s3":  # what the S3 API itself lists (pyarrow may leave empty "folder/" marker objects)
        assert sorted(k for k in s3.keys(prefix[1] + "/") if not k.endswith("/")) == [
            f"{prefix[1]}/{k}" for k in ("report/img/p.png", "report/report.html")
        ]


def test_output_dir_stages_uploads_and_fetches_from_the_bucket(tmp_path, prefix, s3):
    uri, key = prefix
    od = OutputDir(uri, tmp_path / "cache")
    assert od.remote and od.local.is_relative_to(tmp_path / "cache") and od.uri("t.parquet") == f"{uri}/t.parquet"
    od.path("learngenes/lg.safetensors").write_bytes(b"weights-1")
    assert od.fetch("learngenes/lg.safetensors") is None  # staged, not yet in the bucket: not there
    assert not (od.local / "learngenes/lg.safetensors").exists()  # and the stale staged copy is dropped
    od.path("learngenes/lg.safetensors").write_bytes(b"weights-1")
    od.push("learngenes/lg.safetensors")
    assert s3.keys(key) == [f"{key}/learngenes/lg.safetensors"]

    # another machine (a fresh staging folder) finds it and downloads it on demand
    other = OutputDir(uri, tmp_path / "elsewhere")
    got = other.fetch("learngenes/lg.safetensors")
    assert got.read_bytes() == b"weights-1" and got.is_relative_to(tmp_path / "elsewhere")
    assert other.exists("learngenes") and not other.exists("trials.parquet")
    assert other.fetch("trials.parquet") is None and other.read_text("config.yaml") is None

    # the bucket is the truth: a changed object replaces the staged copy, a deleted one removes it
    time.sleep(1.1)  # S3 modification times have one-second resolution
    s3.client.put_object(Bucket=s3.bucket, Key=f"{key}/learngenes/lg.safetensors", Body=b"weights-2")
    assert other.fetch("learngenes/lg.safetensors").read_bytes() == b"weights-2"
    s3.client.delete_object(Bucket=s3.bucket, Key=f"{key}/learngenes/lg.safetensors")
    assert other.fetch("learngenes/lg.safetensors") is None
    assert not (other.local / "learngenes/lg.safetensors").exists()


def test_local_output_dir_is_the_folder_itself(tmp_path):
    od = OutputDir(tmp_path / "run", tmp_path / "cache")
    assert not od.remote and od.local == tmp_path / "run"
    od.path("a/b.json").write_text("{}")
    assert od.push("a/b.json") == str(tmp_path / "run" / "a" / "b.json")
    assert od.fetch("a/b.json") == tmp_path / "run" / "a" / "b.json" and od.fetch("c") is None
    assert not (tmp_path / "cache").exists()


def test_learngene_on_s3_loads_through_a_local_copy(tiny_learngene_path, prefix, s3):
    from mmlg_ray.errors import UserError
    from mmlg_ray.method.learngene import load_learngene

    uri = f"{prefix[0]}/lg.safetensors"
    storage.upload(tiny_learngene_path, uri)
    lg = load_learngene(uri)
    assert lg.meta.tensors_sha256 == load_learngene(tiny_learngene_path).meta.tensors_sha256
    with pytest.raises(UserError, match="does not exist"):
        load_learngene(f"{prefix[0]}/missing.safetensors")


def test_descend_and_report_jobs_take_uris(tiny_learngene_path, prefix, s3, tmp_path):
    """jobs/descend.py reads a learngene from the bucket and writes the descendant there; jobs/report.py
    on a URI without tables is refused with exit 2 like a local folder without them."""
    from jobs import descend, report

    uri, key = prefix
    storage.upload(tiny_learngene_path, f"{uri}/lg.safetensors")
    assert (
        descend.main(
            [
                "--learngene",
                f"{uri}/lg.safetensors",
                "--modality",
                "image",
                "--depth",
                "2",
                "--width",
                "64",
                "--out",
                f"{uri}/desc",
            ]
        )
        == 0
    )
    assert sorted(s3.keys(f"{key}/desc/")) == [
        f"{key}/desc/open_clip_config.json",
        f"{key}/desc/open_clip_model.safetensors",
    ]
    assert report.main([f"{uri}/nothing-here"]) == 2


def test_a_local_output_folder_is_made_absolute(tmp_path, monkeypatch):
    """Trials read stage artifacts by the output folder's path from their own working folders (Tune
    moves each trial into one): a relative --output must not reach them relative."""
    from mmlg_ray.storage import OutputDir

    monkeypatch.chdir(tmp_path)
    od = OutputDir("runs/x")
    assert od.target == str(tmp_path / "runs" / "x") and od.uri("learngenes/a.safetensors").startswith(str(tmp_path))
