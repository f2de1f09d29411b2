"""A real S3 endpoint for tests: moto's threaded server on 127.0.0.1.

The server runs in this process but is reached over HTTP like any S3-compatible store, so the
code under test is not patched. Credentials are fake; :func:`fake_aws_env` lists the
environment a test should set (through ``monkeypatch``) before creating clients.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid

import boto3
import botocore.config
from moto.server import ThreadedMotoServer

__all__ = [
    "FAKE_ACCESS_KEY_ID",
    "FAKE_REGION",
    "FAKE_SECRET_ACCESS_KEY",
    "MotoS3Server",
    "fake_aws_env",
    "fresh_bucket_name",
    "start_moto_server",
]

FAKE_ACCESS_KEY_ID = "testing-access-key-id"
FAKE_SECRET_ACCESS_KEY = "testing-secret-access-key"
FAKE_REGION = "us-east-1"


@dataclasses.dataclass
class MotoS3Server:
    """A running moto server.

    Attributes:
        server: The underlying :class:`ThreadedMotoServer`.
        endpoint_url: ``http://127.0.0.1:<port>``.
    """

    server: ThreadedMotoServer
    endpoint_url: str

    @functools.cached_property
    def admin_client(self):
        """An S3 client with explicit fake credentials (no environment needed), made once."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=FAKE_REGION,
            aws_access_key_id=FAKE_ACCESS_KEY_ID,
            aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name when ``None``) and return its name."""
        bucket = name or fresh_bucket_name()
        self.admin_client.create_bucket(Bucket=bucket)
        return bucket

    def stop(self) -> None:
        """Stop the server."""
        self.server.stop()


def fresh_bucket_name(prefix: str = "test-bucket") -> str:
    """Return a unique, valid bucket name."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def start_moto_server() -> MotoS3Server:
    """Start moto's server on ``127.0.0.1`` on a free port and return it, ready to serve."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return MotoS3Server(server=server, endpoint_url=f"http://{host}:{port}")


def fake_aws_env(endpoint_url: str, bucket: str) -> dict[str, str]:
    """Return the environment that points ``S3Storage`` at the moto server with fake keys."""
    return {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": FAKE_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "S3_ENDPOINT_URL": endpoint_url,
        "S3_BUCKET": bucket,
    }
