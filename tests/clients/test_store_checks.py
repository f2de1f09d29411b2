"""The store proves it honours conditional writes (``lightning_lora.clients.store_checks``)."""

from __future__ import annotations

from lightning_lora.clients.storage import S3Storage
from lightning_lora.clients.store_checks import PROBE_PREFIX, conditional_write_problems
from tests.support.header_proxy import HeaderDroppingProxy


def test_moto_honours_both_conditions_and_the_probe_leaves_nothing(s3_env: S3Storage) -> None:
    assert conditional_write_problems(s3_env) == []
    assert s3_env.list_keys(PROBE_PREFIX) == []


def test_a_store_behind_a_header_dropping_proxy_is_found_out(s3_env: S3Storage) -> None:
    with HeaderDroppingProxy(s3_env.endpoint_url or "") as proxy:
        behind = S3Storage(s3_env.bucket, endpoint_url=proxy.endpoint_url, retry_budget_s=2)
        problems = conditional_write_problems(behind)
        assert proxy.dropped == 3  # one If-None-Match twice, one If-Match
    assert len(problems) == 2
    assert "If-None-Match" in problems[0] and "If-Match" in problems[1]
    assert s3_env.list_keys(PROBE_PREFIX) == []
