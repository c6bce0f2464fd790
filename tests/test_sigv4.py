"""``seeder.backends.sigv4``: the signatures botocore would make, and when we make them.

Against botocore's own SigV4 signer (the reference the servers in the other tests
accept) for the same request at the same second; the real-server round trips are in
``tests/test_origins.py`` (the ``s3`` backend signs here, ``s3-boto3`` through boto3).
"""

from __future__ import annotations

import datetime as dt

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from seeder.backends.sigv4 import (
    EMPTY_SHA256,
    SignedEndpoint,
    Signer,
    StaticKeys,
    canonical_path,
    signed_endpoint_from_env,
)

ENV = {
    "AWS_ENDPOINT_URL": "http://10.0.0.5:9000",
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//////////token=="])
@pytest.mark.parametrize(
    ("endpoint", "key"),
    [
        ("http://10.0.0.5:9000", "models/llama-70b/model-00001-of-00030.safetensors"),
        ("http://s3.internal", "odd name/ünïcode+plus=eq&amp~tilde"),
        ("http://[::1]:8333/base", "a/b"),
    ],
)
def test_signatures_are_botocores(method: str, token: str | None, endpoint: str, key: str) -> None:
    keys = StaticKeys(ENV["AWS_ACCESS_KEY_ID"], ENV["AWS_SECRET_ACCESS_KEY"], token)
    signed = SignedEndpoint(endpoint, "eu-west-3", keys)
    url = signed.object_url("bucket-1", key)
    theirs = AWSRequest(method=method, url=url, headers={})
    S3SigV4Auth(Credentials(keys.access_key, keys.secret_key, token), "s3", "eu-west-3").add_auth(
        theirs
    )
    when = dt.datetime.strptime(theirs.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=dt.UTC
    )
    ours = Signer(signed).headers(method, url, when)
    assert theirs.headers["X-Amz-Content-SHA256"] == EMPTY_SHA256 == ours["x-amz-content-sha256"]
    assert ours["authorization"] == theirs.headers["Authorization"]
    assert ours.get("x-amz-security-token") == token


def test_paths_are_encoded_once_as_signed_and_sent() -> None:
    assert canonical_path("b", "dir/a b+c~d") == "/b/dir/a%20b%2Bc~d"
    assert canonical_path("b", "ü") == "/b/%C3%BC"


def test_the_signing_key_follows_the_day() -> None:
    signer = Signer(SignedEndpoint("http://h", "us-east-1", StaticKeys("AKID", "secret")))
    day1 = signer.headers(
        "GET", "http://h/b/k", dt.datetime(2026, 12, 6, 23, 59, 59, tzinfo=dt.UTC)
    )
    day2 = signer.headers("GET", "http://h/b/k", dt.datetime(2026, 12, 7, 0, 0, 0, tzinfo=dt.UTC))
    assert "20261206/us-east-1/s3/aws4_request" in day1["authorization"]
    assert "20261207/us-east-1/s3/aws4_request" in day2["authorization"]
    with pytest.raises(ValueError, match="query"):
        signer.headers("GET", "http://h/b/k?x=1", dt.datetime.now(dt.UTC))


def test_requests_are_signed_here_only_for_a_named_endpoint_and_static_keys() -> None:
    found = signed_endpoint_from_env(ENV)
    assert found is not None
    assert (found.endpoint, found.region) == ("http://10.0.0.5:9000", "us-east-1")
    assert "wJalr" not in repr(found)  # the secret never reaches a log line
    s3_first = signed_endpoint_from_env({**ENV, "AWS_ENDPOINT_URL_S3": "https://s3.x:8443/"})
    assert s3_first is not None and s3_first.endpoint == "https://s3.x:8443"
    region = signed_endpoint_from_env({**ENV, "AWS_DEFAULT_REGION": "ap-south-1"})
    assert region is not None and region.region == "ap-south-1"
    same = signed_endpoint_from_env({**ENV, "AWS_REGION": "us-east-1"})
    assert same is not None and same.region == "us-east-1"
    bypassed = {**ENV, "HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "localhost,10.0.0.5"}
    assert signed_endpoint_from_env(bypassed) is not None
    assert signed_endpoint_from_env({**ENV, "HTTPS_PROXY": "http://proxy:3128"}) is not None
    # boto3 decides: AWS itself, profiles, a shared config file, settings botocore
    # reads its own way, proxies, an opt-out, odd endpoints.
    for env in (
        {k: v for k, v in ENV.items() if k != "AWS_ENDPOINT_URL"},
        {k: v for k, v in ENV.items() if k != "AWS_SECRET_ACCESS_KEY"},
        {**ENV, "SWARM_S3_BOTO3": "1"},
        {**ENV, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"},
        {**ENV, "AWS_PROFILE": "prod"},
        {**ENV, "AWS_REGION": "eu-west-1"},  # botocore 1.44 signs for AWS_DEFAULT_REGION
        {**ENV, "AWS_SECURITY_TOKEN": "t"},
        {**ENV, "HTTP_PROXY": "http://proxy:3128"},
        {**ENV, "http_proxy": "http://proxy:3128", "no_proxy": "other.host"},
        {**ENV, "AWS_ENDPOINT_URL": "ftp://h"},
        {**ENV, "AWS_ENDPOINT_URL": "http://user:pw@h"},
    ):
        assert signed_endpoint_from_env(env) is None, env
    assert signed_endpoint_from_env(ENV, shared_config=True) is None
