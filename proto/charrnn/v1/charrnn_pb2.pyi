from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InvalidWordPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVALID_WORD_POLICY_UNSPECIFIED: _ClassVar[InvalidWordPolicy]
    INVALID_WORD_POLICY_REJECT: _ClassVar[InvalidWordPolicy]
    INVALID_WORD_POLICY_REPORT: _ClassVar[InvalidWordPolicy]

class ResultField(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_FIELD_UNSPECIFIED: _ClassVar[ResultField]
    RESULT_FIELD_OUTPUTS: _ClassVar[ResultField]
    RESULT_FIELD_HIDDEN: _ClassVar[ResultField]
    RESULT_FIELD_CELL: _ClassVar[ResultField]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
    VERSION_STATE_UNLOADING: _ClassVar[VersionState]
INVALID_WORD_POLICY_UNSPECIFIED: InvalidWordPolicy
INVALID_WORD_POLICY_REJECT: InvalidWordPolicy
INVALID_WORD_POLICY_REPORT: InvalidWordPolicy
RESULT_FIELD_UNSPECIFIED: ResultField
RESULT_FIELD_OUTPUTS: ResultField
RESULT_FIELD_HIDDEN: ResultField
RESULT_FIELD_CELL: ResultField
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_FAILED: VersionState
VERSION_STATE_UNLOADING: VersionState

class State(_message.Message):
    __slots__ = ("hidden", "cell")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    hidden: _containers.RepeatedScalarFieldContainer[float]
    cell: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, hidden: _Optional[_Iterable[float]] = ..., cell: _Optional[_Iterable[float]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "words", "initial_states", "invalid_words", "version", "fields")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATES_FIELD_NUMBER: _ClassVar[int]
    INVALID_WORDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    words: _containers.RepeatedScalarFieldContainer[str]
    initial_states: _containers.RepeatedCompositeFieldContainer[State]
    invalid_words: InvalidWordPolicy
    version: int
    fields: _containers.RepeatedScalarFieldContainer[ResultField]
    def __init__(self, model: _Optional[str] = ..., words: _Optional[_Iterable[str]] = ..., initial_states: _Optional[_Iterable[_Union[State, _Mapping]]] = ..., invalid_words: _Optional[_Union[InvalidWordPolicy, str]] = ..., version: _Optional[int] = ..., fields: _Optional[_Iterable[_Union[ResultField, str]]] = ...) -> None: ...

class WordResult(_message.Message):
    __slots__ = ("word", "length", "outputs", "hidden", "cell", "error")
    WORD_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    word: str
    length: int
    outputs: _containers.RepeatedScalarFieldContainer[float]
    hidden: _containers.RepeatedScalarFieldContainer[float]
    cell: _containers.RepeatedScalarFieldContainer[float]
    error: str
    def __init__(self, word: _Optional[str] = ..., length: _Optional[int] = ..., outputs: _Optional[_Iterable[float]] = ..., hidden: _Optional[_Iterable[float]] = ..., cell: _Optional[_Iterable[float]] = ..., error: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "inference_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("model", "hidden_size", "num_layers", "results", "timing", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    hidden_size: int
    num_layers: int
    results: _containers.RepeatedCompositeFieldContainer[WordResult]
    timing: Timing
    version: int
    def __init__(self, model: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., results: _Optional[_Iterable[_Union[WordResult, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelMetadata]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelMetadata, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "error", "is_default")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: VersionState
    error: str
    is_default: bool
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., error: _Optional[str] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("name", "kind", "input_size", "hidden_size", "num_layers", "nonlinearity", "alphabet", "artifact_sha256", "execution_provider", "max_word_length", "version", "versions")
    class ArtifactSha256Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NONLINEARITY_FIELD_NUMBER: _ClassVar[int]
    ALPHABET_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MAX_WORD_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    input_size: int
    hidden_size: int
    num_layers: int
    nonlinearity: str
    alphabet: str
    artifact_sha256: _containers.ScalarMap[str, str]
    execution_provider: str
    max_word_length: int
    version: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., input_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., nonlinearity: _Optional[str] = ..., alphabet: _Optional[str] = ..., artifact_sha256: _Optional[_Mapping[str, str]] = ..., execution_provider: _Optional[str] = ..., max_word_length: _Optional[int] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...
