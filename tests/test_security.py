"""TLS, mTLS, certificate rotation, bearer tokens and hostile bytes, over real loopback gRPC (in-process servers).

Certificates are made with trustme (the `pki` fixture in tests/conftest.py, shared with test_tls_handshakes.py);
servers are charrnn-server's own create_server() (tests/helpers.py InProcessServer) over the torch-free unit
repository, so these run in the unit subset.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import CharRnnClient, CharRnnError, EncodeRequest
from clients.errors import UnauthenticatedError, error_details
from clients.security import ClientSecurity
from proto.charrnn.v1 import charrnn_pb2 as pb
from server.core.admission import ByteBudget
from server.core.errors import TooManyBytesInFlightError, shown_word
from server.grpc.auth import TokenFile, TokenFileError, parse_tokens
from tests.helpers import InProcessServer, write_pair

pytestmark = pytest.mark.unit


def serve(repository: Path, *flags: str) -> InProcessServer:
    return InProcessServer(repository, "--watch-interval-s", "0.2", *flags)


def encode_once(target: str, security: ClientSecurity) -> list[float]:
    with CharRnnClient(target, timeout=5, security=security) as client:
        return client.encode("lstm", ["hello"])[0].hidden.ravel().tolist()


def failure(target: str, security: ClientSecurity) -> CharRnnError:
    with pytest.raises(CharRnnError) as raised:
        encode_once(target, security)
    return raised.value


def test_certificate_rotation_keeps_open_connections_and_serves_the_new_certificate_to_new_ones(
    unit_repository: Path, tmp_path: Path, pki: dict[str, Path]
) -> None:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    cert.write_bytes(pki["server_cert"].read_bytes())
    key.write_bytes(pki["server_key"].read_bytes())
    server = serve(unit_repository, "--tls-cert", str(cert), "--tls-key", str(key), "--watch-interval-s", "0")
    try:
        old = ClientSecurity.from_files(tls_ca=pki["ca"])
        with CharRnnClient(server.target, timeout=5, security=old) as kept:
            before = kept.encode("lstm", ["hello"])[0].hidden
            new_ca = trustme.CA()
            (tmp_path / "new-ca.pem").write_bytes(new_ca.cert_pem.bytes())
            write_pair(tmp_path, new_ca.issue_cert("127.0.0.1"), "live")
            assert server.call(server.running.reload())  # what SIGHUP runs
            assert (kept.encode("lstm", ["hello"])[0].hidden == before).all()  # the open connection goes on
            assert "wrong --tls-ca" in failure(server.target, old).details  # new connections: the new certificate
            assert len(encode_once(server.target, ClientSecurity.from_files(tls_ca=tmp_path / "new-ca.pem"))) == 6
            key.write_text("not a key")  # a broken rotation keeps the certificate in force
            assert not server.call(server.running.reload())
            assert len(encode_once(server.target, ClientSecurity.from_files(tls_ca=tmp_path / "new-ca.pem"))) == 6
    finally:
        server.stop()


def test_unusable_certificate_files_are_start_up_errors_naming_the_file(
    unit_repository: Path, tmp_path: Path, pki: dict[str, Path]
) -> None:
    from server.grpc.security import CredentialsError

    missing = tmp_path / "missing.pem"
    with pytest.raises(CredentialsError, match="missing.pem"):
        serve(unit_repository, "--tls-cert", str(missing), "--tls-key", str(pki["server_key"]))
    with pytest.raises(CredentialsError, match="do not load as a pair"):
        serve(unit_repository, "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["client_key"]))


# ---- tokens -----------------------------------------------------------------------------------------------------


def test_the_token_file_format() -> None:
    assert parse_tokens("# clients\nalice  tok-a\n\nbob\ttok-b  # ops\n", "f") == {"alice": "tok-a", "bob": "tok-b"}
    for text, message in [("alice", "found 1 field"), ("a TOKEN1\na TOKEN2", "appears twice"),
                          ("a TOKEN1\nb TOKEN1", "share one token"), ("# nothing", "no tokens"),
                          ("a TOKEN1 extra", "found 3 field")]:
        with pytest.raises(TokenFileError, match=message) as raised:
            parse_tokens(text, "f")
        assert "TOKEN1" not in str(raised.value)  # never the token itself


@pytest.fixture
def token_server(unit_repository: Path, tmp_path: Path) -> Iterator[tuple[InProcessServer, Path]]:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice secret-alice-1\nbob secret-bob-1\n")
    server = InProcessServer(unit_repository, "--auth-token-file", str(tokens), "--watch-interval-s", "0.2",
                             "--metrics-port", "0")
    yield server, tokens
    server.stop()


def with_token(token: str | None) -> ClientSecurity:
    return ClientSecurity(token=token)


def test_a_right_token_passes_and_missing_or_wrong_ones_get_the_same_unauthenticated_status(
    token_server: tuple[InProcessServer, Path],
) -> None:
    server, _ = token_server
    assert len(encode_once(server.target, with_token("secret-alice-1"))) == 6
    missing, wrong = failure(server.target, with_token(None)), failure(server.target, with_token("secret-alice-2"))
    for error in (missing, wrong):
        assert isinstance(error, UnauthenticatedError) and error.reason == "UNAUTHENTICATED"
        assert not error.retryable
        assert "secret" not in error.details
    assert missing.details == wrong.details


def test_health_is_open_and_reflection_needs_a_token(token_server: tuple[InProcessServer, Path]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server, _ = token_server
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(reflect)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        unknown = channel.unary_unary("/no.such.Service/Method")
        with pytest.raises(grpc.RpcError) as raised:
            unknown(b"", timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED  # not telling what exists


def test_a_rotated_token_file_is_picked_up_without_a_restart(token_server: tuple[InProcessServer, Path]) -> None:
    server, tokens = token_server
    with CharRnnClient(server.target, timeout=5, security=with_token("secret-alice-1")) as kept:
        kept.encode("lstm", ["he"])
        tokens.write_text("alice secret-alice-2\nbob secret-bob-1\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the watcher polls every 0.2 s
            try:
                kept.encode("lstm", ["he"])
            except UnauthenticatedError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the old token was still accepted 10 s after the file changed")
    assert len(encode_once(server.target, with_token("secret-alice-2"))) == 6
    tokens.write_text("garbage")  # a broken file keeps the tokens in force
    assert not server.call(server.running.reload())
    assert len(encode_once(server.target, with_token("secret-alice-2"))) == 6


def test_metrics_count_client_names_never_tokens(token_server: tuple[InProcessServer, Path]) -> None:
    server, _ = token_server
    encode_once(server.target, with_token("secret-bob-1"))
    failure(server.target, with_token("secret-wrong"))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'charrnn_client_requests_total{client="bob",result="accepted"}' in text
    assert 'charrnn_client_requests_total{client="",result="denied"}' in text
    assert "secret" not in text


def test_token_lookup_is_by_digest_and_names_the_client(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice a-token\n")
    tokens = TokenFile(path)
    assert tokens.client("Bearer a-token") == "alice"
    assert tokens.client("Bearer a-token ") is None and tokens.client("a-token") is None and tokens.client(None) is None
    assert "a-token" not in repr(tokens.__dict__)  # only digests are kept


# ---- hostile bytes ----------------------------------------------------------------------------------------------


MALFORMED = {
    "random bytes": b"\xff\xfe\xfd\x00\x01garbage",
    "invalid UTF-8 in a string": b"\x0a\x03\xff\xfe\xfd",
    "a truncated field": b"\x12\x10ab",
}


@pytest.mark.parametrize("method", ["Encode", "ListModels", "GetModel"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bytes_on_every_rpc_get_invalid_argument_naming_the_message(
    in_process: InProcessServer, method: str, case: str
) -> None:
    expected = {"Encode": "EncodeRequest", "ListModels": "ListModelsRequest", "GetModel": "GetModelRequest"}[method]
    data = MALFORMED[case]
    with grpc.insecure_channel(in_process.target) as channel:
        call = channel.unary_unary(f"/charrnn.v1.CharRnn/{method}")
        try:
            call(data, timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert error.details() == f"request is not a valid charrnn.v1.{expected}"
            assert error_details(error).reason == "MALFORMED_REQUEST"
        else:
            assert method == "ListModels" and case != "random bytes", "parsed as an empty request"
    assert in_process.running.engine is not None
    assert in_process.running.server is not None


def test_a_malformed_stream_message_ends_the_stream_with_invalid_argument(in_process: InProcessServer) -> None:
    good = pb.EncodeRequest(model="lstm", words=["hel"]).SerializeToString()
    with grpc.insecure_channel(in_process.target) as channel:
        call = channel.stream_stream("/charrnn.v1.CharRnn/EncodeStream")
        responses = call(iter([good, MALFORMED["random bytes"], good]), timeout=5)
        first = next(responses)
        assert pb.EncodeResponse.FromString(first).results[0].word == "hel"
        with pytest.raises(grpc.RpcError) as raised:
            list(responses)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "request is not a valid charrnn.v1.EncodeRequest"


def test_a_100k_character_word_gets_a_bounded_invalid_argument(in_process: InProcessServer) -> None:
    with CharRnnClient(in_process.target, timeout=10) as client, pytest.raises(CharRnnError) as raised:
        client.encode("lstm", ["h" * 100_000])
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "WORD_TOO_LONG"
    assert f"'{'h' * 40}…' (100000 characters)" in error.details and len(error.details) < 200


def test_shown_word_escapes_control_characters_and_cuts_long_words() -> None:
    assert shown_word("he\x00l\u202elo\n") == "'he\\x00l\\u202elo\\n'"
    assert shown_word("h" * 100_000) == f"'{'h' * 40}…' (100000 characters)"
    assert len(shown_word("\U0001f600" * 1000)) < 100


def test_the_byte_budget_refuses_beyond_its_limit_and_nothing_stays_taken(in_process: InProcessServer) -> None:
    budget = ByteBudget(10)
    budget.take(6)
    with pytest.raises(TooManyBytesInFlightError) as raised:
        budget.take(5)
    assert raised.value.retry_after_s and "--max-inflight-bytes" in raised.value.message
    budget.give(6)
    budget.take(10)
    with CharRnnClient(in_process.target, timeout=5) as client:
        client.encode("lstm", ["hello"])
        with pytest.raises(CharRnnError):
            client.encode("lstm", ["hexlo"])
        list(client.encode_stream([EncodeRequest("lstm", ["he"])] * 3))
    with grpc.insecure_channel(in_process.target) as channel:
        with pytest.raises(grpc.RpcError):
            channel.unary_unary("/charrnn.v1.CharRnn/Encode")(MALFORMED["random bytes"], timeout=5)
    assert in_process.running.budget.in_use == 0


@pytest.fixture
def in_process(unit_repository: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(unit_repository)
    yield server
    server.stop()


# ---- the Open Inference Protocol front end is behind the same TLS and tokens ------------------------------------


def v2_words(words: list[str]) -> Any:
    import numpy as np
    import tritonclient.grpc as triton

    tensor = triton.InferInput("WORDS", [len(words)], "BYTES")
    tensor.set_data_from_numpy(np.array(words, dtype=np.object_))
    return tensor


def test_v2_needs_the_same_token_and_its_readiness_probe_is_not_exempt(
    token_server: tuple[InProcessServer, Path],
) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    server, _ = token_server
    client = triton.InferenceServerClient(server.target)
    try:
        for call in (lambda: client.infer("lstm", [v2_words(["hello"])]),
                     lambda: client.infer("lstm", [v2_words(["hello"])], headers={"authorization": "Bearer nope"}),
                     lambda: client.is_server_ready()):
            with pytest.raises(InferenceServerException) as raised:
                call()
            assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
        result = client.infer("lstm", [v2_words(["hello"])], headers={"authorization": "Bearer secret-bob-1"})
        with CharRnnClient(server.target, security=with_token("secret-alice-1")) as charrnn:
            expected = charrnn.encode("lstm", ["hello"])[0]
        assert result.as_numpy("HIDDEN")[0].tolist() == expected.hidden.tolist()
    finally:
        client.close()


def test_v2_over_tls(pki: dict[str, Path], unit_repository: Path) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    server = serve(unit_repository, "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]))
    try:
        secure = triton.InferenceServerClient(server.target, ssl=True, root_certificates=str(pki["ca"]))
        try:
            assert secure.is_server_ready()
            assert secure.infer("rnn", [v2_words(["he", "hello"])]).as_numpy("LENGTHS").tolist() == [2, 5]
        finally:
            secure.close()
        plaintext = triton.InferenceServerClient(server.target)
        try:
            with pytest.raises(InferenceServerException) as raised:
                plaintext.is_server_ready(client_timeout=5)
            assert raised.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
        finally:
            plaintext.close()
    finally:
        server.stop()


def test_a_ca_file_that_holds_no_certificate_is_a_clear_client_error(pki: dict[str, Path], tmp_path: Path) -> None:
    from clients.security import ClientSecurityError

    assert ClientSecurity.from_files(tls_ca=pki["ca"]).ca == pki["ca"].read_bytes()
    not_a_certificate = tmp_path / "server.key"
    not_a_certificate.write_bytes(pki["server_key"].read_bytes())
    with pytest.raises(ClientSecurityError, match=r"CA file .*server\.key: no PEM certificate in it"):
        ClientSecurity.from_files(tls_ca=not_a_certificate)


@pytest.mark.parametrize(("method", "streaming", "message_type"), [
    ("/grpc.health.v1.Health/Check", "unary", "grpc.health.v1.HealthCheckRequest"),
    ("/grpc.health.v1.Health/Watch", "server", "grpc.health.v1.HealthCheckRequest"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "both", "grpc.reflection.v1alpha.ServerReflectionRequest"),
])
def test_malformed_bytes_to_health_and_reflection_get_invalid_argument_too(
    in_process: InProcessServer, method: str, streaming: str, message_type: str
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    garbage = b"\xff\xff\xff"
    with grpc.insecure_channel(in_process.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            if streaming == "unary":
                channel.unary_unary(method)(garbage, timeout=5)
            elif streaming == "server":
                list(channel.unary_stream(method)(garbage, timeout=5))
            else:
                list(channel.stream_stream(method)(iter([garbage]), timeout=5))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert raised.value.details() == f"request is not a valid {message_type}"  # type: ignore[attr-defined]
        assert error_details(raised.value).reason == "MALFORMED_REQUEST"  # type: ignore[arg-type]
        # ... and the wrapped services still answer good requests:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {service.name for response in reflect for service in response.list_services_response.service}
        assert {"charrnn.v1.CharRnn", "inference.GRPCInferenceService"} <= names


def test_without_a_token_malformed_bytes_are_refused_before_they_are_parsed(
    token_server: tuple[InProcessServer, Path],
) -> None:
    server, _ = token_server
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            list(channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                iter([b"\xff\xff"]), timeout=5))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary("/grpc.health.v1.Health/Check")(b"\xff\xff", timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]  # health: open
