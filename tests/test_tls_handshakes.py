"""TLS handshakes that fail, and the one line each client error names as the cause; mTLS accepting and refusing.

In-process servers as in tests/test_security.py, but slower (each refused handshake waits out gRPC's own
reconnect attempts), so these stay out of the fast unit subset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clients.security import ClientSecurity
from tests.helpers import InProcessServer
from tests.test_security import encode_once, failure, serve

pytestmark = pytest.mark.e2e


@pytest.fixture
def tls_server(unit_repository: Path, pki: dict[str, Path]) -> Iterator[InProcessServer]:
    server = serve(unit_repository, "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]))
    yield server
    server.stop()


def test_tls_works_and_plaintext_or_a_wrong_ca_fail_with_one_line_naming_the_cause(
    tls_server: InProcessServer, pki: dict[str, Path]
) -> None:
    assert len(encode_once(tls_server.target, ClientSecurity.from_files(tls_ca=pki["ca"]))) == 6
    plain = failure(tls_server.target, ClientSecurity())
    assert plain.code == grpc.StatusCode.UNAVAILABLE and "likely serves TLS" in plain.details
    wrong = failure(tls_server.target, ClientSecurity.from_files(tls_ca=pki["other_ca"]))
    assert "wrong --tls-ca" in wrong.details and "\n" not in wrong.details


def test_a_tls_client_to_a_plaintext_server_is_told_so(unit_repository: Path, pki: dict[str, Path]) -> None:
    server = serve(unit_repository)
    try:
        error = failure(server.target, ClientSecurity.from_files(tls_ca=pki["ca"]))
        assert "does not speak TLS" in error.details
    finally:
        server.stop()


def test_a_hostname_mismatch_is_named(unit_repository: Path, pki: dict[str, Path]) -> None:
    server = serve(unit_repository, "--tls-cert", str(pki["misnamed_cert"]), "--tls-key", str(pki["misnamed_key"]))
    try:
        assert "hostname mismatch" in failure(server.target, ClientSecurity.from_files(tls_ca=pki["ca"])).details
    finally:
        server.stop()


def test_mtls_accepts_a_client_certificate_and_refuses_a_client_without_one(
    unit_repository: Path, pki: dict[str, Path]
) -> None:
    server = serve(unit_repository, "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
                   "--tls-client-ca", str(pki["ca"]))
    try:
        with_cert = ClientSecurity.from_files(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
        assert len(encode_once(server.target, with_cert)) == 6
        refused = failure(server.target, ClientSecurity.from_files(tls_ca=pki["ca"]))
        assert refused.code == grpc.StatusCode.UNAVAILABLE and "client certificate" in refused.details
    finally:
        server.stop()
