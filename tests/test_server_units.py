"""Unit tests of the server's pure parts: the alphabet (check, encode, one-hot batch) and the configuration.

The alphabet is checked against a deliberately naive, per-character reference on random words, including
non-ASCII letters (and letters outside the Basic Multilingual Plane) both in the alphabet and outside it.
The configuration is checked for defaults, environment variables, and flags winning over the environment.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from server.config import DEFAULTS, ServerConfig, build_parser, parse_config, usable_cores
from server.core.alphabet import Alphabet, WordIndices, one_hot_batch
from server.core.batcher import BatchSettings
from server.core.engine import EngineSettings, Limits
from server.core.errors import InvalidRequestError, InvalidWordError, Reason
from tests.helpers import LARGE_ALPHABET

pytestmark = pytest.mark.unit

# Alphabets whose code points are not in sorted order, with non-ASCII letters (one outside the BMP).
ALPHABETS = ("helo", "héλo", "λhé😀o", "zyxwvA0ß", LARGE_ALPHABET)
FOREIGN = "xqé€😀\u00a0\t Ωλßa"  # some of these are in some alphabets: the reference decides


def naive_problem(index: int, word: str, letters: str, max_length: int) -> tuple[int, str, str] | None:
    """(index, word, reason) the way a person would check one word, character by character."""
    if len(word) == 0:
        return index, word, "the word is empty", Reason.WORD_EMPTY
    if len(word) > max_length:
        return index, word, f"the word has {len(word)} characters, more than the limit of {max_length}", Reason.WORD_TOO_LONG
    for position, char in enumerate(word):
        if char not in letters:
            return (
                index,
                word,
                f"character {char!r} at position {position} is not in the model's alphabet {letters!r}",
                Reason.WORD_NOT_IN_ALPHABET,
            )
    return None


def naive_one_hot(words: Sequence[str], letters: str) -> npt.NDArray[np.float32]:
    """[words, max_len, len(letters)] by explicit loops."""
    max_len = max(len(word) for word in words)
    batch = np.zeros((len(words), max_len, len(letters)), dtype=np.float32)
    for row, word in enumerate(words):
        for column, char in enumerate(word):
            batch[row, column, letters.index(char)] = 1.0
    return batch


def random_words(rng: random.Random, letters: str, count: int, max_length: int, bad_rate: float) -> list[str]:
    """Random words of lengths 0..max_length+3; some characters are drawn from outside the alphabet."""
    words = []
    for _ in range(count):
        length = rng.choice([0, 1, 2, max_length, max_length + 1, rng.randint(1, max_length + 3)])
        words.append(
            "".join(rng.choice(FOREIGN) if rng.random() < bad_rate else rng.choice(letters) for _ in range(length))
        )
    return words


# ---- Alphabet.check ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("letters", ALPHABETS)
@pytest.mark.parametrize("seed", range(4))
def test_check_matches_naive_reference(letters: str, seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([1, 3, 8, 20])
    words = random_words(rng, letters, count=200, max_length=max_length, bad_rate=rng.choice([0.0, 0.02, 0.2]))
    problems = Alphabet(letters).check(words, max_length)
    assert len(problems) == len(words)
    for index, (word, problem) in enumerate(zip(words, problems, strict=True)):
        expected = naive_problem(index, word, letters, max_length)
        if expected is None:
            assert problem is None, (index, word, problem)
        else:
            assert isinstance(problem, InvalidWordError), (index, word)
            assert isinstance(problem, InvalidRequestError)  # -> INVALID_ARGUMENT
            assert (problem.index, problem.word, problem.problem, problem.reason) == expected
            assert str(problem) == f"word {index} {word!r}: {expected[2]}"
            assert problem.metadata["word_index"] == str(index)


def test_check_names_index_word_character_and_position() -> None:
    alphabet = Alphabet("héλo")
    problems = alphabet.check(["héλo", "oλé", "hé€λ", "", "h😀", "hhhhhh"], max_length=5)
    assert problems[0] is None and problems[1] is None
    assert str(problems[2]) == "word 2 'hé€λ': character '€' at position 2 is not in the model's alphabet 'héλo'"
    assert str(problems[3]) == "word 3 '': the word is empty"
    assert str(problems[4]) == "word 4 'h😀': character '😀' at position 1 is not in the model's alphabet 'héλo'"
    assert str(problems[5]) == "word 5 'hhhhhh': the word has 6 characters, more than the limit of 5"
    assert [p.index for p in problems if p is not None] == [2, 3, 4, 5]


def test_check_reports_first_bad_character_of_each_word() -> None:
    problems = Alphabet("helo").check(["hexyo", "xhello", "hellz"], max_length=10)
    assert [(p.index, p.problem, p.position) for p in problems if p is not None] == [
        (0, "character 'x' at position 2 is not in the model's alphabet 'helo'", 2),
        (1, "character 'x' at position 0 is not in the model's alphabet 'helo'", 0),
        (2, "character 'z' at position 4 is not in the model's alphabet 'helo'", 4),
    ]
    assert all(p is not None and p.reason == Reason.WORD_NOT_IN_ALPHABET for p in problems)
    assert [p.metadata for p in problems if p is not None] == [
        {"word_index": "0", "position": "2"}, {"word_index": "1", "position": "0"}, {"word_index": "2", "position": "4"},
    ]


def test_a_long_bad_word_is_named_not_echoed() -> None:
    word = "h" * 50_000 + "x"
    (problem,) = Alphabet("helo").check([word], max_length=100_000)
    assert problem is not None and problem.reason == Reason.WORD_NOT_IN_ALPHABET
    assert len(str(problem)) < 300 and "(50001 characters)" in str(problem)
    assert problem.metadata == {"word_index": "0", "position": "50000"}


def test_check_on_only_empty_words_and_on_no_words() -> None:
    alphabet = Alphabet("héλo")
    problems = alphabet.check(["", ""], max_length=3)
    assert [str(p) for p in problems] == ["word 0 '': the word is empty", "word 1 '': the word is empty"]
    assert alphabet.check([], max_length=3) == []


def test_code_points_below_and_above_the_alphabet_are_rejected() -> None:
    # 'é' (U+00E9) and 'λ' (U+03BB): probe both ends of the sorted code points and the gap between.
    alphabet = Alphabet("éλ")
    problems = alphabet.check(["\x00", "a", "ê", "μ", "\U0010ffff", "éλ"], max_length=4)
    assert [p is None for p in problems] == [False, False, False, False, False, True]


# ---- Alphabet.encode and one_hot_batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("letters", ALPHABETS)
@pytest.mark.parametrize("seed", range(3))
def test_encode_and_one_hot_match_naive_reference(letters: str, seed: int) -> None:
    rng = random.Random(100 + seed)
    words = [w for w in random_words(rng, letters, count=150, max_length=30, bad_rate=0.0) if 0 < len(w) <= 30]
    alphabet = Alphabet(letters)
    assert len(alphabet) == len(letters)
    assert all(problem is None for problem in alphabet.check(words, 30))
    encoded = alphabet.indices(words)
    assert encoded.lengths.dtype == np.int32
    assert encoded.lengths.tolist() == [len(word) for word in words]
    assert encoded.longest == max(len(word) for word in words)
    assert encoded.indices.tolist() == [letters.index(char) for word in words for char in word]
    batch = one_hot_batch(encoded, len(letters))
    assert batch.dtype == np.float32
    np.testing.assert_array_equal(batch, naive_one_hot(words, letters))


def test_one_hot_batch_pads_with_zero_rows() -> None:
    alphabet = Alphabet("héλo")
    batch = one_hot_batch(alphabet.indices(["o", "héλoh", "λλ"]), 4)
    assert batch.shape == (3, 5, 4)
    assert batch[0, 0].tolist() == [0, 0, 0, 1] and not batch[0, 1:].any()
    assert batch[1].argmax(axis=1).tolist() == [0, 1, 2, 3, 0] and batch[1].sum() == 5
    assert batch[2, :2].argmax(axis=1).tolist() == [2, 2] and not batch[2, 2:].any()


def test_one_hot_batch_of_hand_built_indices() -> None:
    encoded = WordIndices(np.array([2, 0, 1, 1], dtype=np.int64), np.array([1, 3], dtype=np.int32), 3)
    expected = np.zeros((2, 3, 3), dtype=np.float32)
    expected[0, 0, 2] = 1
    expected[1, 0, 0] = expected[1, 1, 1] = expected[1, 2, 1] = 1
    np.testing.assert_array_equal(one_hot_batch(encoded, 3), expected)


# ---- parse_config --------------------------------------------------------------------------------------------------


def test_defaults_with_an_empty_environment() -> None:
    config = parse_config([], {})
    assert config == ServerConfig(
        repository=Path("./model_repository"), address="0.0.0.0", port=50051, device="auto", grace_seconds=10.0,
        max_words=4096, max_word_length=256, max_message_bytes=64 * 1024 * 1024, metrics_port=9090,
        log_level="INFO", batching=True, max_batch_words=4096, max_queue_delay_ms=5.0, max_queue_gap_ms=1.0,
        max_queue_words=65536, run_threads=1, port_file=None, keep_versions=1, poll_seconds=0.0,
    )


def test_the_config_builds_the_cores_settings() -> None:
    config = parse_config(["--max-words", "7", "--max-word-length", "9", "--max-batch-words", "11",
                           "--max-queue-delay-ms", "1.5", "--max-queue-gap-ms", "0.5", "--max-queue-words", "13",
                           "--run-threads", "2",
                           "--device", "cpu", "--keep-versions", "3", "--inline-max-us", "50"], {})
    settings = config.engine_settings()
    assert settings == EngineSettings(
        "cpu", 2, Limits(max_words=7, max_word_length=9), BatchSettings(11, 0.0015, 13, 0.0005), keep_versions=3,
        inline_max_s=50e-6,
    )
    assert parse_config(["--no-batching"], {}).engine_settings().batching is None


def test_every_flag_defaults_to_the_configs_own_default() -> None:
    assert parse_config([], {}) == DEFAULTS == ServerConfig()
    parser = build_parser({})
    for field in dataclasses.fields(ServerConfig):
        assert parser.get_default(field.name) == getattr(DEFAULTS, field.name), field.name


FULL_ENV = {
    "CHARRNN_REPOSITORY": "/env/repo",
    "CHARRNN_ADDRESS": "10.0.0.1",
    "CHARRNN_PORT": "1111",
    "CHARRNN_DEVICE": "cuda",
    "CHARRNN_GRACE_SECONDS": "2.5",
    "CHARRNN_MAX_WORDS": "7",
    "CHARRNN_MAX_WORD_LENGTH": "9",
    "CHARRNN_MAX_MESSAGE_BYTES": "12345",
    "CHARRNN_METRICS_PORT": "-1",
    "CHARRNN_LOG_LEVEL": "DEBUG",
    "CHARRNN_BATCHING": "off",
    "CHARRNN_MAX_BATCH_WORDS": "11",
    "CHARRNN_MAX_QUEUE_DELAY_MS": "1.5",
    "CHARRNN_MAX_QUEUE_GAP_MS": "0.25",
    "CHARRNN_MAX_QUEUE_WORDS": "13",
    "CHARRNN_RUN_THREADS": "4",
    "CHARRNN_PORT_FILE": "/env/ports.json",
    "CHARRNN_KEEP_VERSIONS": "2",
    "CHARRNN_POLL_SECONDS": "30",
    "CHARRNN_METRICS_ADDRESS": "10.0.0.2",
    "CHARRNN_TLS_CERT": "/env/cert.pem",
    "CHARRNN_TLS_KEY": "/env/key.pem",
    "CHARRNN_TLS_CLIENT_CA": "/env/ca.pem",
    "CHARRNN_AUTH_TOKEN_FILE": "/env/tokens",
    "CHARRNN_WATCH_INTERVAL_S": "0",
    "CHARRNN_MAX_INFLIGHT_BYTES": "99999",
    "CHARRNN_MAX_CONCURRENT_STREAMS": "8",
    "CHARRNN_KEEPALIVE_MIN_PING_INTERVAL_S": "3",
    "CHARRNN_MAX_CONNECTION_IDLE_S": "0",
    "CHARRNN_MAX_CONNECTION_AGE_S": "60",
    "CHARRNN_MAX_CONNECTION_AGE_GRACE_S": "5",
}

ENV_SECURITY_AND_LIMITS = dict(
    metrics_address="10.0.0.2", tls_cert=Path("/env/cert.pem"), tls_key=Path("/env/key.pem"),
    tls_client_ca=Path("/env/ca.pem"), auth_token_file=Path("/env/tokens"), watch_interval_s=0.0,
    max_inflight_bytes=99999, max_concurrent_streams=8, keepalive_min_ping_interval_s=3.0,
    max_connection_idle_s=0.0, max_connection_age_s=60.0, max_connection_age_grace_s=5.0,
)


def test_every_setting_comes_from_its_environment_variable() -> None:
    config = parse_config([], FULL_ENV)
    assert config == ServerConfig(
        repository=Path("/env/repo"), address="10.0.0.1", port=1111, device="cuda", grace_seconds=2.5,
        max_words=7, max_word_length=9, max_message_bytes=12345, metrics_port=-1, log_level="DEBUG",
        batching=False, max_batch_words=11, max_queue_delay_ms=1.5, max_queue_gap_ms=0.25, max_queue_words=13,
        run_threads=4,
        port_file=Path("/env/ports.json"), keep_versions=2, poll_seconds=30.0, **ENV_SECURITY_AND_LIMITS,
    )


def test_flags_win_over_the_environment() -> None:
    flags = [
        "--repository", "/flag/repo", "--address", "127.0.0.1", "--port", "2222", "--device", "cpu",
        "--grace-seconds", "0.5", "--max-words", "70", "--max-word-length", "90", "--max-message-bytes", "54321",
        "--metrics-port", "0", "--log-level", "WARNING", "--batching", "--max-batch-words", "110",
        "--max-queue-delay-ms", "0", "--max-queue-gap-ms", "2", "--max-queue-words", "130",
        "--run-threads", "2", "--port-file", "/flag/ports.json", "--keep-versions", "4", "--poll-seconds", "0.5",
        "--metrics-address", "127.0.0.2",
        "--tls-cert", "/flag/cert.pem", "--tls-key", "/flag/key.pem", "--tls-client-ca", "/flag/ca.pem",
        "--auth-token-file", "/flag/tokens", "--watch-interval-s", "2", "--max-inflight-bytes", "777777",
        "--max-concurrent-streams", "16", "--keepalive-min-ping-interval-s", "30", "--max-connection-idle-s", "9",
        "--max-connection-age-s", "0", "--max-connection-age-grace-s", "1",
    ]
    config = parse_config(flags, FULL_ENV)
    assert config == ServerConfig(
        repository=Path("/flag/repo"), address="127.0.0.1", port=2222, device="cpu", grace_seconds=0.5,
        max_words=70, max_word_length=90, max_message_bytes=54321, metrics_port=0, log_level="WARNING",
        batching=True, max_batch_words=110, max_queue_delay_ms=0.0, max_queue_gap_ms=2.0, max_queue_words=130,
        run_threads=2,
        port_file=Path("/flag/ports.json"), keep_versions=4, poll_seconds=0.5, metrics_address="127.0.0.2",
        tls_cert=Path("/flag/cert.pem"),
        tls_key=Path("/flag/key.pem"), tls_client_ca=Path("/flag/ca.pem"), auth_token_file=Path("/flag/tokens"),
        watch_interval_s=2.0, max_inflight_bytes=777777, max_concurrent_streams=16,
        keepalive_min_ping_interval_s=30.0, max_connection_idle_s=9.0, max_connection_age_s=0.0,
        max_connection_age_grace_s=1.0,
    )


@pytest.mark.parametrize(
    ("env_value", "flags", "expected"),
    [
        ("1", [], True), ("true", [], True), ("YES", [], True), ("on", [], True),
        ("0", [], False), ("false", [], False), ("No", [], False), ("off", [], False),
        ("true", ["--no-batching"], False), ("0", ["--batching"], True),
    ],
)
def test_batching_switch_from_env_and_flag(env_value: str, flags: list[str], expected: bool) -> None:
    assert parse_config(flags, {"CHARRNN_BATCHING": env_value}).batching is expected


def test_empty_environment_variable_means_unset() -> None:
    config = parse_config([], {"CHARRNN_MAX_WORDS": "", "CHARRNN_PORT_FILE": "", "CHARRNN_DEVICE": ""})
    assert (config.max_words, config.port_file, config.device) == (4096, None, "auto")


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARRNN_MAX_WORDS", "3")
    monkeypatch.setenv("CHARRNN_GRACE_SECONDS", "4")
    config = parse_config([])
    assert (config.max_words, config.grace_seconds) == (3, 4.0)
    assert parse_config(["--max-words", "5"]).max_words == 5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-words", "0"], "--max-words must be at least 1"),
        (["--max-word-length", "0"], "--max-word-length must be at least 1"),
        (["--max-message-bytes", "0"], "--max-message-bytes must be at least 1"),
        (["--run-threads", "0"], "--run-threads must be at least 1"),
        (["--grace-seconds", "-1"], "cannot be negative"),
        (["--max-queue-delay-ms", "-0.5"], "cannot be negative"),
        (["--max-queue-gap-ms", "-1"], "cannot be negative"),
        (["--poll-seconds", "-1"], "cannot be negative"),
        (["--keep-versions", "0"], "--keep-versions must be at least 1"),
        (["--device", "gpu"], "invalid choice: 'gpu'"),
        (["--max-words", "many"], "invalid int value: 'many'"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca (mTLS) needs --tls-cert"),
        (["--max-inflight-bytes", "100"], "--max-inflight-bytes must be at least --max-message-bytes"),
        (["--max-concurrent-streams", "0"], "--max-concurrent-streams must be at least 1"),
        (["--max-connection-age-s", "-1"], "--max-connection-age-s cannot be negative"),
    ],
)
def test_bad_flags_are_usage_errors(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_config(flags, {})
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_limits_from_the_environment_are_checked_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_config([], {"CHARRNN_MAX_WORDS": "0"})
    assert raised.value.code == 2
    assert "--max-words must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHARRNN_DEVICE", "gpu"),  # accepted silently today: the server later dies with a ValueError traceback
        ("CHARRNN_MAX_WORDS", "abc"),  # a bare ValueError traceback today, even for --help
        ("CHARRNN_BATCHING", "maybe"),
        ("CHARRNN_GRACE_SECONDS", "soon"),
    ],
)
def test_malformed_environment_values_are_usage_errors(
    variable: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad CHARRNN_* value must be reported like a bad flag (exit status 2, the value named), not crash later."""
    with pytest.raises(SystemExit) as raised:
        parse_config([], {variable: value})
    assert raised.value.code == 2
    assert value in capsys.readouterr().err


def test_unknown_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--log-level verbose is accepted today and the server then dies in logging.basicConfig with a traceback."""
    assert parse_config(["--log-level", "debug"], {}).log_level.upper() == "DEBUG"
    with pytest.raises(SystemExit) as raised:
        parse_config(["--log-level", "verbose"], {})
    assert raised.value.code == 2
    assert "verbose" in capsys.readouterr().err


def test_every_rpc_of_the_proto_is_registered_with_its_request_type() -> None:
    from proto.charrnn.v1 import charrnn_pb2
    from server.grpc.charrnn_v1 import REQUEST_TYPES, CharRnnService, method_handlers
    from server.metrics import Metrics

    handlers = method_handlers(CharRnnService(Metrics()))
    methods = charrnn_pb2.DESCRIPTOR.services_by_name["CharRnn"].methods
    assert sorted(handlers) == sorted(method.name for method in methods)
    for method in methods:
        handler = handlers[method.name]
        assert (handler.request_streaming, handler.response_streaming) == (
            method.client_streaming, method.server_streaming
        ), method.name
        # Handlers take bytes and parse them themselves (malformed bytes get INVALID_ARGUMENT, not UNKNOWN).
        assert handler.request_deserializer is None, method.name
        assert REQUEST_TYPES[method.name] is getattr(charrnn_pb2, method.input_type.name), method.name


def test_grpc_options_state_the_resource_bounds_in_grpcs_units() -> None:
    options = dict(parse_config(["--max-concurrent-streams", "8", "--keepalive-min-ping-interval-s", "2.5",
                                 "--max-connection-idle-s", "0", "--max-connection-age-s", "60",
                                 "--max-connection-age-grace-s", "5", "--max-message-bytes", "1000"], {}).grpc_options())
    assert options["grpc.max_concurrent_streams"] == 8
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 2500
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert "grpc.max_connection_idle_ms" not in options  # 0: never
    assert (options["grpc.max_connection_age_ms"], options["grpc.max_connection_age_grace_ms"]) == (60000, 5000)
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 1000
    defaults = dict(DEFAULTS.grpc_options())
    assert defaults["grpc.max_connection_idle_ms"] == 600000 and "grpc.max_connection_age_ms" not in defaults


def test_workers_flag_environment_and_auto() -> None:

    assert parse_config([], {}).workers == DEFAULTS.workers == usable_cores()
    assert parse_config(["--workers", "3"], {}).workers == 3
    assert parse_config([], {"CHARRNN_WORKERS": "2"}).workers == 2
    assert parse_config([], {"CHARRNN_WORKERS": "auto"}).workers == usable_cores()
    assert parse_config(["--workers", "auto"], {"CHARRNN_WORKERS": "5"}).workers == usable_cores()
    with pytest.raises(SystemExit):
        parse_config(["--workers", "0"], {})
    with pytest.raises(SystemExit):
        parse_config(["--workers", "many"], {})
    assert "--worker-index" not in build_parser({}).format_help()  # set by the supervisor only


def test_usable_cores_honours_the_affinity_mask_and_a_cgroup_quota(tmp_path: Path) -> None:
    import os

    affinity = len(os.sched_getaffinity(0))
    cpu_max, absent = tmp_path / "cpu.max", tmp_path / "absent"
    assert usable_cores(absent, absent) == affinity
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max, absent) == affinity
    cpu_max.write_text("150000 100000\n")  # --cpus 1.5: two workers, if the mask allows two
    assert usable_cores(cpu_max, absent) == min(affinity, 2)
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max, absent) == 1
    # cgroup v1 (Docker 20.10 on a v1 host): cpu.cfs_quota_us / cpu.cfs_period_us, -1 for no quota
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(absent, v1) == affinity
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")  # --cpus 1
    assert usable_cores(absent, v1) == 1


def test_only_a_supervisors_workers_share_the_port() -> None:
    assert dict(parse_config([], {}).grpc_options())["grpc.so_reuseport"] == 0
    assert dict(parse_config(["--workers", "4"], {}).grpc_options())["grpc.so_reuseport"] == 0  # the supervisor
    assert dict(parse_config(["--worker-index", "1"], {}).grpc_options())["grpc.so_reuseport"] == 1
