"""A real S3-compatible object store for tests: moto's standalone server on a free loopback port.

`s3_store` yields an S3Store: the endpoint, a fresh bucket, and the environment a process (driver, Ray
node, CLI) needs to reach it the way a user sets it up: standard AWS credential variables and
FWSWEEP_S3_ENDPOINT. moto accepts any keys; the instance-metadata lookup is off so that a process without
keys fails at once instead of asking 169.254.169.254.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sweep.tracking import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "fwsweep-test", "AWS_SECRET_ACCESS_KEY": "fwsweep-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class S3Store:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return CREDENTIALS | {"FWSWEEP_S3_ENDPOINT": self.endpoint}

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under prefix, less pyarrow's empty directory markers (`dir/`); read with boto3,
        independently of the code under test."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="x",
                              aws_secret_access_key="x", region_name="us-east-1")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])
                if not obj["Key"].endswith("/")]


@pytest.fixture(scope="module")
def s3_store() -> Iterator[S3Store]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        bucket = f"fwsweep-{secrets.token_hex(4)}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield S3Store(endpoint, bucket)
    finally:
        server.stop()
