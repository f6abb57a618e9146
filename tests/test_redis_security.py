"""Redis with a password (``redis://:pw@``) and over TLS (``rediss://``, a throwaway CA from ``trustme``): the proxy
and a ``fama detector`` process supervise a turn through it; a wrong password or an unverifiable certificate is
an outage (the answer is served degraded), never a 500.

Certificate settings ride in the URL as redis-py reads them: ``?ssl_ca_certs=/path/ca.pem`` (the CA to trust),
``ssl_certfile``/``ssl_keyfile`` (a client certificate), ``ssl_cert_reqs=none`` (no verification; not advised).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import trustme

from detector_service.bus import keys
from proxy.bench.processes import Service, fama, free_port, redis_args, service_env, wait_for_port
from tests.supervised_upstream import ScriptedModel
from tests.supervision_harness import LOOKED_UP, QUESTION, TOOLS, always_cancels, cancels_until_told, proxy_for

PASSWORD = "s3cret/pass:word"  # characters that must be percent-encoded in a URL
AUTH = f":{quote(PASSWORD, safe='')}@"

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]


@dataclass
class SecuredRedis:
    port: int
    ca: Path  # the CA that signed the server's certificate (TLS only)
    tls: bool

    def url(self, auth: str = AUTH, query: str = "") -> str:
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0{query}"

    @property
    def verified_url(self) -> str:
        return self.url(query=f"?ssl_ca_certs={self.ca}" if self.tls else "")


@pytest.fixture(scope="module", params=["auth", "tls+auth"])
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredRedis]:
    workdir = tmp_path_factory.mktemp("redis")
    tls = request.param == "tls+auth"
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: workdir / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server_cert.private_key_pem.write_to_path(str(paths["key"]))
    port = free_port()
    extra = ["--requirepass", PASSWORD]
    if tls:
        extra += ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
        extra += ["--tls-cert-file", str(paths["cert"]), "--tls-key-file", str(paths["key"])]
        extra += ["--tls-ca-cert-file", str(paths["ca"])]
    # A later --port wins: with TLS the plain port is closed.
    server = Service("redis", redis_args(port, workdir, *extra), service_env(), workdir)
    try:
        wait_for_port(port)
        yield SecuredRedis(port, paths["ca"], tls)
    finally:
        server.stop()


@contextlib.contextmanager
def detector(url: str, tmp_path: Path) -> Iterator[Service]:
    """``fama detector`` connected to ``url``; ready once its consumer group exists."""
    service = Service("detector", fama("detector"), service_env(FAMA_REDIS_URL=url, FAMA_METRICS_PORT="0"), tmp_path)
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            service.check_alive()
            with contextlib.suppress(redis.ResponseError):
                if any(g["name"] == keys.DETECTOR_GROUP.encode() for g in client.xinfo_groups(keys.TURNS_STREAM)):
                    break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the detector never joined its group:\n{service.output()}")
        client.close()
        yield service
    finally:
        service.stop()


def test_proxy_and_detector_supervise_through_the_secured_redis(secured: SecuredRedis, tmp_path: Path) -> None:
    settings = {"mode": "enforce", "redis_url": secured.verified_url, "profile": {"deadline_ms": 5_000}}
    with (
        detector(secured.verified_url, tmp_path),
        proxy_for(ScriptedModel(cancels_until_told), tmp_path, **settings) as (
            client,
            _,
        ),
    ):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
    # The verdict came back from the detector over this Redis: the unconfirmed cancellation was sent back.
    assert raw.headers["x-fama-intervention"] == "retry:DCV"
    assert "x-fama-degraded" not in raw.headers
    assert raw.parse().choices[0].message.content == QUESTION
    store = redis.Redis.from_url(secured.verified_url)
    try:
        assert store.xlen(keys.TURNS_STREAM) >= 2
    finally:
        store.close()


@pytest.mark.parametrize(
    ("secured", "problem"),
    [
        ("auth", "wrong password"),
        ("auth", "no password"),
        ("tls+auth", "wrong password"),
        ("tls+auth", "no password"),
        ("tls+auth", "unverified certificate"),
    ],
    indirect=["secured"],
)
def test_a_refused_connection_is_an_outage_not_a_500(secured: SecuredRedis, problem: str, tmp_path: Path) -> None:
    url = {
        "wrong password": secured.url(
            auth=":not-the-password@", query=f"?ssl_ca_certs={secured.ca}" if secured.tls else ""
        ),
        "no password": secured.url(auth="", query=f"?ssl_ca_certs={secured.ca}" if secured.tls else ""),
        # The system's trust store does not know the throwaway CA: verification is on by default.
        "unverified certificate": secured.url(),
    }[problem]
    settings = {"mode": "enforce", "redis_url": url, "profile": {"deadline_ms": 300}}
    with proxy_for(ScriptedModel(always_cancels), tmp_path, **settings) as (client, _):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=LOOKED_UP, tools=TOOLS)
    assert raw.status_code == 200
    assert raw.headers["x-fama-degraded"] == "outage"
