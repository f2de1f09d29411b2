"""S3 URLs as messages carry them (``lightning_lora.clients.s3_names.parse_s3_url``)."""

from __future__ import annotations

import pytest

from lightning_lora.clients.s3_names import parse_s3_url
from lightning_lora.errors import InvalidMessageError


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
