"""Errors the service answers with: each carries its gRPC status; anything else is an INTERNAL bug."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of every error a client is told about, with the status code it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFoundError(ServiceError):
    """The request names a model the server has not loaded."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidRequestError(ServiceError):
    """The request is malformed (no words, wrong state shapes, ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidWordError(InvalidRequestError):
    """One word cannot be encoded; the message names its index, the word and what is wrong."""

    def __init__(self, index: int, word: str, reason: str) -> None:
        super().__init__(f"word {index} {word!r}: {reason}")
        self.index = index
        self.word = word
        self.reason = reason


class RequestTooLargeError(ServiceError):
    """The request asks for more than the configured limits allow."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OverloadedError(ServiceError):
    """The model's queue is full; the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDownError(ServiceError):
    """The server is draining and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelsLoadingError(ServiceError):
    """The server has started but is still loading its models."""

    code = grpc.StatusCode.UNAVAILABLE
