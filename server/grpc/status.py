"""Core errors -> gRPC statuses, in one place for every gRPC front end.

Each status carries a google.rpc.Status in the `grpc-status-details-bin` trailer (grpcio-status) with a
google.rpc.ErrorInfo (domain ERROR_DOMAIN, the core's Reason, a little metadata such as the word's index), and
a google.rpc.RetryInfo when trying again later may succeed (queue full, starting, draining). Clients decide
from those details (clients/errors.py), never from the message text. Anything that is not a ServiceError is a
bug: INTERNAL with a generic message; the traceback goes to the server log only.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.core.errors import ErrorKind, Reason, ServiceError

ERROR_DOMAIN = "charrnn.v1"
"""ErrorInfo.domain of every error this server sends (clients check it before trusting a reason)."""

INTERNAL_MESSAGE = "internal error; see the server log"

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC code an error is answered with."""
    return STATUS_CODES[error.kind] if isinstance(error, ServiceError) else grpc.StatusCode.INTERNAL


def rich_status(error: BaseException) -> grpc.Status:
    """The status (code, message, ErrorInfo and maybe RetryInfo details) that answers an error."""
    if not isinstance(error, ServiceError):
        error = ServiceError(INTERNAL_MESSAGE, Reason.INTERNAL)
    code = STATUS_CODES[error.kind]
    details = [_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))]
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(message)


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """End the RPC with the status for `error` (raises grpc.aio.AbortError, as context.abort does)."""
    await context.abort_with_status(rich_status(error))


def _packed(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
