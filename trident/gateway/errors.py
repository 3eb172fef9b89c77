"""HTTP errors in OpenAI's shape, and the one table that maps Trident's errors onto them.

Every error the gateway answers has OpenAI's body::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "size",
               "code": "invalid_request"}}

``code`` is Trident's wire error code (``trident.errors``), ``type`` OpenAI's class of
error, ``param`` the request field at fault when one is (400s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from trident import errors as te

__all__ = [
    "ERROR_TABLE",
    "GatewayError",
    "error_body",
    "from_trident",
    "param_of",
]

# Trident's error -> (HTTP status, OpenAI error type, code). The first matching class
# wins (subclasses before their bases).
ERROR_TABLE: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (te.InvalidRequestError, 400, "invalid_request_error", "invalid_request"),
    (te.UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    (te.OverloadedError, 429, "rate_limit_error", "overloaded"),
    (te.UnavailableError, 503, "server_error", "unavailable"),
    (te.AuthenticationError, 503, "server_error", "unavailable"),
    (te.ConnectionError, 503, "server_error", "unavailable"),
    (te.RequestTimeoutError, 504, "server_error", "timeout"),
    (te.StageFailedError, 500, "server_error", "stage_failed"),
    (te.CancelledError, 409, "invalid_request_error", "cancelled"),
    (te.RequestProtocolError, 500, "server_error", "protocol"),
    (te.TridentError, 500, "server_error", "internal"),
)

# Seconds a client is told to wait (Retry-After) after a 429 or a 503.
RETRY_AFTER_S = 1

# Request fields as the scheduler names them -> as the HTTP API does.
_API_NAME = {"height": "size", "width": "size"}
_PARAMS = (
    "prompt",
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "slo_s",
    "model",
)
_PATH = re.compile(r"\$\.(?:params\.)?([A-Za-z_]+)")
_WORD = re.compile(r"\b(" + "|".join(_PARAMS) + r")\b")


@dataclass(eq=False)
class GatewayError(Exception):
    """An HTTP error answered in OpenAI's body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if self.status in (429, 503) and "Retry-After" not in self.headers:
            self.headers["Retry-After"] = str(RETRY_AFTER_S)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def param_of(message: str, renames: dict[str, str] | None = None) -> str | None:
    """The request field a validation message is about, as the HTTP API names it:
    the SDK's ``$.params.height``, or the first parameter name the message mentions."""
    m = _PATH.search(message) or _WORD.search(message)
    if m is None:
        return None
    name = m.group(1)
    names = {**_API_NAME, **(renames or {})}
    return names.get(name, name)


def from_trident(exc: BaseException, renames: dict[str, str] | None = None) -> GatewayError:
    """The HTTP error for one of Trident's exceptions (:data:`ERROR_TABLE`)."""
    message = str(getattr(exc, "message", None) or exc) or type(exc).__name__
    for cls, status, kind, code in ERROR_TABLE:
        if isinstance(exc, cls):
            param = param_of(message, renames) if status == 400 else None
            if isinstance(exc, te.UnknownModelError):
                param = "model"
            return GatewayError(status, message, kind, code, param)
    return GatewayError(500, f"internal error: {message}", "server_error", "internal")
