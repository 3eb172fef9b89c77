"""Every exception Trident raises to its users, in one tree.

::

    TridentError
    ├── ConfigError              bad daemon configuration (model dir, TOML, flags)
    ├── ModelError               a directory that is not a servable diffusers pipeline
    ├── ProtocolError            malformed frame, unknown message type, wrong version
    └── RequestError             a request ended without a result (carries request_id)
        ├── UnknownModelError    the scheduler serves no model of that name
        ├── InvalidRequestError  impossible or absurd parameters (size, frames, steps)
        ├── OverloadedError      admission control refused it: retry later
        ├── StageFailedError     a stage raised (out-of-memory included) and retries ran out
        ├── RequestTimeoutError  no result within the client's timeout
        └── CancelledError       cancelled by the client

The wire carries an error *code* (see ``trident.sched.types.ErrorCode``);
:func:`error_from_code` maps it back onto this tree on the client side.
"""

from __future__ import annotations

__all__ = [
    "CancelledError",
    "ConfigError",
    "InvalidRequestError",
    "ModelError",
    "OverloadedError",
    "ProtocolError",
    "RequestError",
    "RequestTimeoutError",
    "StageFailedError",
    "TridentError",
    "UnknownModelError",
    "error_from_code",
]


class TridentError(Exception):
    """Base of every Trident exception."""


class ConfigError(TridentError):
    """Invalid daemon configuration."""


class ModelError(TridentError):
    """A model directory that Trident cannot serve (not diffusers, unsupported family)."""


class ProtocolError(TridentError):
    """A message that does not follow the wire protocol."""


class RequestError(TridentError):
    """A request that ended without a result."""

    code = "internal"

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.request_id))


class UnknownModelError(RequestError):
    code = "unknown_model"


class InvalidRequestError(RequestError):
    code = "invalid_request"


class OverloadedError(RequestError):
    code = "overloaded"


class StageFailedError(RequestError):
    code = "stage_failed"


class RequestTimeoutError(RequestError):
    code = "timeout"


class CancelledError(RequestError):
    code = "cancelled"


_BY_CODE: dict[str, type[RequestError]] = {
    "unknown_model": UnknownModelError,
    "invalid_request": InvalidRequestError,
    "overloaded": OverloadedError,
    "stage_failed": StageFailedError,
    "out_of_memory": StageFailedError,
    "timeout": RequestTimeoutError,
    "cancelled": CancelledError,
}


def error_from_code(code: str, message: str, request_id: str | None = None) -> RequestError:
    """The exception a client raises for an error code received on the wire."""
    cls = _BY_CODE.get(code, RequestError)
    return cls(message, request_id)
