"""S3 storage (``lightning_lora.clients.storage``) against moto's server, reached over HTTP."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from lightning_lora.clients.image_types import sniff_image_format
from lightning_lora.clients.storage import S3Storage
from lightning_lora.data.datamodule import StyleDataModule, find_style_images, load_rgb
from lightning_lora.errors import (
    DatasetError,
    DownloadError,
    InvalidImageError,
    InvalidMessageError,
    StorageUnavailableError,
    UploadError,
)
from lightning_lora.jobs.layout import checkpoint_prefix, kohya_key, model_key
from tests.support.images import image_bytes
from tests.support.net import closed_port_url
from tests.support.s3 import MotoS3Server, fake_aws_env


def put(storage: S3Storage, key: str, data: bytes) -> str:
    """Store ``data`` under ``key`` with the storage's own client; return its URL."""
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=data)
    return storage.s3_url(key)


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
    storage = S3Storage.from_env(multipart_threshold_mb=5)
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


def test_download_images_keeps_same_basenames_apart(s3_env: S3Storage, tmp_path: Path) -> None:
    data = [image_bytes("JPEG", (i * 90, 0, 0)) for i in range(3)]
    urls = [put(s3_env, "a/1.jpg", data[0]), put(s3_env, "b/1.jpg", data[1])]
    urls.append(put(s3_env, "c/..%2F..evil name$.jpg", data[2]))
    dest = tmp_path / "images"
    paths = s3_env.download_images(urls, dest, 10, 10_000, 100_000)
    assert [p.name for p in paths] == ["0000_1.jpg", "0001_1.jpg", "0002__2F..evil_name_.jpg"]
    assert [p.read_bytes() for p in paths] == data
    assert all(p.parent == dest for p in paths)
    assert sorted(dest.iterdir()) == sorted(paths)  # no partial files left


def test_download_images_missing_object_names_url(s3_env: S3Storage, tmp_path: Path) -> None:
    ok = put(s3_env, "imgs/ok.jpg", image_bytes("JPEG"))
    missing = s3_env.s3_url("imgs/missing.jpg")
    with pytest.raises(DownloadError, match=re.escape(missing)) as info:
        s3_env.download_images([ok, missing], tmp_path, 10, 10_000, 100_000)
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
    data = image_bytes("PNG")
    urls = [put(s3_env, f"imgs/{i}.png", data) for i in range(2)]
    with pytest.raises(DatasetError, match="in total"):
        s3_env.download_images(urls, tmp_path, 10, len(data), len(data) * 3 // 2)


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


def test_extensionless_keys_are_named_by_content_and_train(
    s3_env: S3Storage, tmp_path: Path
) -> None:
    kinds = {"JPEG": (10, 200, 10), "PNG": (200, 10, 10), "WEBP": (10, 10, 200)}
    urls = [
        put(s3_env, f"uploads/3f2a9c{i}", image_bytes(fmt, c))
        for i, (fmt, c) in enumerate(kinds.items())
    ]
    urls.append(put(s3_env, "uploads/e1b2.v2", image_bytes("PNG")))  # a dot, not an extension
    dest = tmp_path / "images"
    paths = s3_env.download_images(urls, dest, 10, 10_000, 100_000)
    assert [p.name for p in paths] == [
        "0000_3f2a9c0.jpg",
        "0001_3f2a9c1.png",
        "0002_3f2a9c2.webp",
        "0003_e1b2.v2.png",
    ]
    assert sorted(dest.iterdir()) == sorted(paths)  # no hidden download left behind
    found = find_style_images(dest, "art by {token}", "zzz")
    assert [item.path for item in found] == paths
    for path, color in zip(paths, kinds.values(), strict=False):
        assert load_rgb(path).getpixel((8, 6)) == pytest.approx(color, abs=12)  # lossy JPEG
    dm = StyleDataModule(str(dest), resolution=16)
    dm.setup("fit")
    assert dm.num_images == len(urls)


def test_wrong_extension_is_replaced_by_the_content_type(s3_env: S3Storage, tmp_path: Path) -> None:
    urls = [
        put(s3_env, "imgs/really_png.jpg", image_bytes("PNG")),
        put(s3_env, "imgs/really_jpeg.PNG", image_bytes("JPEG")),
        put(s3_env, "imgs/kept.JPEG", image_bytes("JPEG")),
        put(s3_env, "imgs/" + "n" * 300 + ".webp", image_bytes("PNG")),
    ]
    paths = s3_env.download_images(urls, tmp_path / "d", 10, 10_000, 100_000)
    names = [p.name for p in paths]
    assert names[:3] == ["0000_really_png.png", "0001_really_jpeg.jpg", "0002_kept.JPEG"]
    assert names[3].endswith("n.png") and len(names[3]) == 105  # capped, extension kept
    assert [sniff_image_format(p) for p in paths] == ["PNG", "JPEG", "JPEG", "PNG"]
    assert [item.path for item in find_style_images(tmp_path / "d", "{token}", "t")] == paths
    assert all(load_rgb(p).size == (16, 12) for p in paths)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (image_bytes("GIF"), "is a GIF file; supported: JPEG, PNG, WebP"),
        (image_bytes("BMP"), "is a BMP file; supported: JPEG, PNG, WebP"),
        (image_bytes("TIFF"), "is a TIFF file; supported: JPEG, PNG, WebP"),
        (b"just some notes\n", "is not an image file (unrecognised content); supported"),
        (b"", "is empty (0 bytes)"),
    ],
    ids=["gif", "bmp", "tiff", "text", "empty"],
)
def test_unsupported_file_among_images_names_its_url(
    s3_env: S3Storage, tmp_path: Path, data: bytes, expected: str
) -> None:
    good = put(s3_env, "style/a.png", image_bytes("PNG"))
    bad = put(s3_env, "style/b.png", data)  # a supported extension does not help
    after = put(s3_env, "style/c.png", image_bytes("PNG"))
    dest = tmp_path / "d"
    with pytest.raises(InvalidImageError, match=re.escape(f"image {bad} {expected}")) as info:
        s3_env.download_images([good, bad, after], dest, 10, 10_000, 100_000)
    assert info.value.error_code == "INVALID_IMAGE"
    assert sorted(p.name for p in dest.iterdir()) == ["0000_a.png"]  # nothing of the bad one


def test_unreachable_store_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in fake_aws_env(closed_port_url(), "some-bucket").items():
        monkeypatch.setenv(name, value)
    storage = S3Storage.from_env(retry_budget_s=1.0, connect_timeout_s=1, read_timeout_s=1)
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    start = time.monotonic()
    # each operation retries for its budget, then gives up naming the URL; not a job failure
    with pytest.raises(StorageUnavailableError, match=re.escape("s3://some-bucket/imgs/1.jpg")):
        storage.download_images(["s3://some-bucket/imgs/1.jpg"], tmp_path / "d", 5, 10, 10)
    assert time.monotonic() - start >= 1.0
    with pytest.raises(StorageUnavailableError, match="s3://some-bucket/models/style_1"):
        storage.upload_file(source, model_key(1))
    with pytest.raises(StorageUnavailableError):
        storage.exists("k")
    with pytest.raises(StorageUnavailableError):
        storage.list_keys("checkpoints/")
    assert time.monotonic() - start < 20
