"""S3 storage against moto's server, reached over HTTP."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from lightning_lora.clients.storage import (
    S3Storage,
    checkpoint_prefix,
    kohya_key,
    local_image_name,
    model_key,
    parse_s3_url,
)
from lightning_lora.errors import (
    DatasetError,
    DownloadError,
    InvalidImageError,
    InvalidMessageError,
    UploadError,
)
from tests.support.s3 import MotoS3Server, fake_aws_env


def put(storage: S3Storage, key: str, data: bytes) -> str:
    """Store ``data`` under ``key`` with the storage's own client; return its URL."""
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=data)
    return storage.s3_url(key)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- parse_s3_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/key.jpg", ("bucket", "key.jpg")),
        ("s3://my.bucket-1/a/b/c 1.png", ("my.bucket-1", "a/b/c 1.png")),
        ("S3://abc/x..y.jpg", ("abc", "x..y.jpg")),
    ],
)
def test_parse_s3_url_accepts(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/iam/",
        "https://bucket.s3.amazonaws.com/key.jpg",
        "s3:/bucket/key",
        "bucket/key",
        "",
        "s3://",
        "s3:///key.jpg",
        "s3://bucket",
        "s3://bucket/",
        "s3://bucket/folder/",
        "s3://bucket//etc/passwd",
        "s3://bucket/../etc/passwd",
        "s3://bucket/a/../../b.jpg",
        "s3://bucket/a/./b.jpg",
        "s3://bucket/a\\..\\b.jpg",
        "s3://bucket/a\nb.jpg",
        "s3://bucket/a\x00b.jpg",
        "s3://Bucket_Upper/key",
        "s3://ab/key",
        "s3://192.168.0.1/key",
        "s3://user:pw@bucket/key",
        "s3://bucket..x/key",
        "s3://" + "b" * 64 + "/key",
        "s3://bucket/" + "k" * 1025,
    ],
)
def test_parse_s3_url_rejects(url: str) -> None:
    with pytest.raises(InvalidMessageError, match="invalid S3 URL"):
        parse_s3_url(url)


def test_parse_s3_url_rejects_non_string_and_disallowed_bucket() -> None:
    with pytest.raises(InvalidMessageError):
        parse_s3_url(None)  # type: ignore[arg-type]
    assert parse_s3_url("s3://good/k", allowed_buckets={"good"}) == ("good", "k")
    with pytest.raises(InvalidMessageError, match="not allowed"):
        parse_s3_url("s3://other/k", allowed_buckets={"good"})


def test_key_helpers() -> None:
    assert model_key(7) == "models/style_7/lora_weights.safetensors"
    assert kohya_key(7) == "models/style_7/lora_kohya.safetensors"
    assert checkpoint_prefix(7) == "checkpoints/style_7/"
    assert S3Storage.model_key(3) == model_key(3)
    with pytest.raises(InvalidMessageError):
        model_key(-1)
    assert local_image_name(3, "a/b/../.hidden name$.jpg") == "0003_hidden_name_.jpg"
    assert local_image_name(0, "x/" + "n" * 300 + ".png").endswith("n.png")
    assert len(local_image_name(0, "x/" + "n" * 300 + ".png")) == 105


# --------------------------------------------------------------------------- objects


def test_storage_reads_environment(s3_env: S3Storage, moto_s3: MotoS3Server) -> None:
    assert s3_env.endpoint_url == moto_s3.endpoint_url
    assert s3_env.bucket.startswith("test-bucket-")
    assert "secret" not in repr(s3_env)


def test_upload_download_exists_list_delete(s3_env: S3Storage, tmp_path: Path) -> None:
    source = tmp_path / "lora.safetensors"
    source.write_bytes(b"weights" * 1000)
    key = model_key(42)
    url = s3_env.upload_file(source, key, extra_metadata={"lora_rank": 16})
    assert url == f"s3://{s3_env.bucket}/models/style_42/lora_weights.safetensors"
    assert s3_env.exists(key) and not s3_env.exists(kohya_key(42))
    head = s3_env.client.head_object(Bucket=s3_env.bucket, Key=key)
    assert head["Metadata"] == {"lora_rank": "16"}

    copy = s3_env.download_file(key, tmp_path / "out" / "copy.safetensors")
    assert copy.read_bytes() == source.read_bytes()
    assert [p.name for p in copy.parent.iterdir()] == ["copy.safetensors"]

    prefix = checkpoint_prefix(42)
    for step in range(5):
        s3_env.upload_file(source, f"{prefix}step_{step}.ckpt")
    keys = s3_env.list_keys(prefix, page_size=2)  # forces 3 pages
    assert keys == [f"{prefix}step_{step}.ckpt" for step in range(5)]
    assert s3_env.delete_keys([*keys[:3], "checkpoints/style_42/missing"]) == 4
    assert s3_env.list_keys(prefix) == keys[3:]
    assert s3_env.list_keys("nothing/") == []


def test_multipart_upload(s3_env: S3Storage, tmp_path: Path) -> None:
    storage = S3Storage(multipart_threshold_mb=5)
    source = tmp_path / "big.bin"
    source.write_bytes(b"\x01" * (6 * 1024 * 1024))
    storage.upload_file(source, "models/big.bin")
    assert storage.download_file("models/big.bin", tmp_path / "b").stat().st_size == 6 * 1024**2


def test_download_file_missing_raises(s3_env: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=f"s3://{s3_env.bucket}/models/none"):
        s3_env.download_file("models/none", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_upload_missing_local_file_or_bad_key(s3_env: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(UploadError, match="models/style_1"):
        s3_env.upload_file(tmp_path / "absent", model_key(1))
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(InvalidMessageError):
        s3_env.upload_file(tmp_path / "f", "../escape")


# --------------------------------------------------------------------------- images


def test_download_images_keeps_same_basenames_apart(s3_env: S3Storage, tmp_path: Path) -> None:
    urls = [put(s3_env, "a/1.jpg", b"first"), put(s3_env, "b/1.jpg", b"second")]
    urls.append(put(s3_env, "c/..%2F..evil name$.jpg", b"third"))
    dest = tmp_path / "images"
    paths = s3_env.download_images(urls, dest, 10, 100, 1000)
    assert [p.name for p in paths] == ["0000_1.jpg", "0001_1.jpg", "0002__2F..evil_name_.jpg"]
    assert [p.read_bytes() for p in paths] == [b"first", b"second", b"third"]
    assert all(p.parent == dest for p in paths)
    assert sorted(dest.iterdir()) == sorted(paths)  # no partial files left


def test_download_images_missing_object_names_url(s3_env: S3Storage, tmp_path: Path) -> None:
    ok = put(s3_env, "imgs/ok.jpg", b"ok")
    missing = s3_env.s3_url("imgs/missing.jpg")
    with pytest.raises(DownloadError, match=re.escape(missing)) as info:
        s3_env.download_images([ok, missing], tmp_path, 10, 100, 1000)
    assert info.value.error_code == "DOWNLOAD_FAILED"


def test_download_images_missing_bucket(s3_env: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=re.escape("s3://no-such-bucket-xyz/k.jpg")):
        s3_env.download_images(["s3://no-such-bucket-xyz/k.jpg"], tmp_path, 10, 100, 1000)


def test_download_images_too_large(s3_env: S3Storage, tmp_path: Path) -> None:
    url = put(s3_env, "imgs/big.jpg", b"x" * 101)
    with pytest.raises(InvalidImageError, match=re.escape(url)) as info:
        s3_env.download_images([url], tmp_path / "d", 10, 100, 1000)
    assert info.value.error_code == "INVALID_IMAGE"
    assert list((tmp_path / "d").iterdir()) == []


def test_download_images_total_too_large(s3_env: S3Storage, tmp_path: Path) -> None:
    urls = [put(s3_env, f"imgs/{i}.jpg", b"x" * 60) for i in range(2)]
    with pytest.raises(DatasetError, match="in total"):
        s3_env.download_images(urls, tmp_path, 10, 100, 100)


def test_download_images_too_many_or_invalid_urls(s3_env: S3Storage, tmp_path: Path) -> None:
    urls = [put(s3_env, f"imgs/{i}.jpg", b"x") for i in range(3)]
    with pytest.raises(InvalidMessageError, match="too many"):
        s3_env.download_images(urls, tmp_path / "d", 2, 100, 1000)
    with pytest.raises(InvalidMessageError, match="file:///etc/passwd"):
        s3_env.download_images([urls[0], "file:///etc/passwd"], tmp_path / "d", 5, 100, 1000)
    with pytest.raises(InvalidMessageError, match="not allowed"):
        s3_env.download_images(urls, tmp_path / "d", 5, 100, 1000, allowed_buckets={"other"})
    assert not (tmp_path / "d").exists()  # validated before anything was fetched
    assert s3_env.download_images([], tmp_path / "d", 5, 100, 1000) == []


# --------------------------------------------------------------------------- unreachable store


def test_unreachable_store_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in fake_aws_env(closed_port_url(), "some-bucket").items():
        monkeypatch.setenv(name, value)
    storage = S3Storage(max_attempts=2, connect_timeout_s=1, read_timeout_s=1)
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    start = time.monotonic()
    with pytest.raises(DownloadError, match=re.escape("s3://some-bucket/imgs/1.jpg")):
        storage.download_images(["s3://some-bucket/imgs/1.jpg"], tmp_path / "d", 5, 10, 10)
    with pytest.raises(UploadError, match="s3://some-bucket/models/style_1"):
        storage.upload_file(source, model_key(1))
    with pytest.raises(DownloadError):
        storage.exists("k")
    with pytest.raises(DownloadError):
        storage.list_keys("checkpoints/")
    assert time.monotonic() - start < 15
