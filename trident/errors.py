"""Every exception Trident raises to its users, in one tree.

::

    TridentError
    ├── ConfigError              bad daemon configuration (model dir, TOML, flags)
    ├── ModelError               a directory that is not a servable diffusers pipeline
    ├── ProtocolError            malformed frame, unknown message type, wrong version
    ├── ConnectionError          no scheduler answers at the address (or it went away)
    │   └── AuthenticationError  the scheduler refused this client's CurveZMQ key
    └── RequestError             a request ended without a result (carries request_id)
        ├── UnknownModelError    the scheduler serves no model of that name
        ├── InvalidRequestError  impossible or absurd parameters (size, frames, steps)
        ├── OverloadedError      admission control refused it: retry later
        ├── UnavailableError     no live device can serve its model, or the scheduler
        │                        that held it is gone
        ├── StageFailedError     a stage raised and retries ran out
        │   └── OutOfMemoryError a stage did not fit in its device's memory
        ├── RequestTimeoutError  no result within the client's timeout
        ├── CancelledError       cancelled by the client
        └── RequestProtocolError the scheduler could not read this request's message

The wire carries an error *code* (see ``trident.sched.types.ErrorCode``);
:func:`error_from_code` maps it back onto this tree on the client side.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CancelledError",
    "ConfigError",
    "ConnectionError",
    "InvalidRequestError",
    "ModelError",
    "OutOfMemoryError",
    "OverloadedError",
    "ProtocolError",
    "RequestError",
    "RequestProtocolError",
    "RequestTimeoutError",
    "StageFailedError",
    "TridentError",
    "UnavailableError",
    "UnknownModelError",
    "error_from_code",
]


class TridentError(Exception):
    """Base of every Trident exception."""


class ConfigError(TridentError):
    """Invalid daemon configuration."""


class ModelError(TridentError):
    """A model directory that Trident cannot serve (not diffusers, unsupported family)."""


class _AboutRequest(TridentError):
    """An error that may name the request it concerns (``request_id``)."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.request_id))


class ProtocolError(_AboutRequest):
    """A message that does not follow the wire protocol. ``request_id`` names the
    request it concerned when the sender's id could still be read."""


class ConnectionError(TridentError):
    """No scheduler answered at the client's address within the connect timeout, or
    the scheduler stopped answering while requests were in flight."""


class AuthenticationError(ConnectionError):
    """The scheduler refused the client's CurveZMQ handshake (key not authorized)."""


class RequestError(_AboutRequest):
    """A request that ended without a result."""

    code = "internal"


class UnknownModelError(RequestError):
    code = "unknown_model"


class InvalidRequestError(RequestError):
    code = "invalid_request"


class OverloadedError(RequestError):
    code = "overloaded"


class UnavailableError(RequestError):
    code = "unavailable"


class RequestProtocolError(RequestError):
    code = "protocol"


class StageFailedError(RequestError):
    code = "stage_failed"


class OutOfMemoryError(StageFailedError):
    """A stage ran out of its device's memory (a CUDA out-of-memory error, or a request
    that fits no device). A :class:`StageFailedError`, so code catching that still
    catches it; the device keeps serving."""

    code = "out_of_memory"


class RequestTimeoutError(RequestError):
    code = "timeout"


class CancelledError(RequestError):
    code = "cancelled"


_BY_CODE: dict[str, type[RequestError]] = {
    "unknown_model": UnknownModelError,
    "invalid_request": InvalidRequestError,
    "overloaded": OverloadedError,
    "stage_failed": StageFailedError,
    "out_of_memory": OutOfMemoryError,
    "timeout": RequestTimeoutError,
    "cancelled": CancelledError,
    "unavailable": UnavailableError,
    "unknown_request": UnavailableError,
    "protocol": RequestProtocolError,
}


def error_from_code(code: str, message: str, request_id: str | None = None) -> RequestError:
    """The exception a client raises for an error code received on the wire."""
    cls = _BY_CODE.get(code, RequestError)
    return cls(message, request_id)
