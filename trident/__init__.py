"""Trident: stage-level serving for diffusion pipelines.

Public API::

    from trident import Client, AsyncClient, GenerateResult, ProgressEvent
    from trident.errors import TridentError, OverloadedError, ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trident.errors import (
    CancelledError,
    ConfigError,
    InvalidRequestError,
    ModelError,
    OutOfMemoryError,
    OverloadedError,
    ProtocolError,
    RequestError,
    RequestTimeoutError,
    StageFailedError,
    TridentError,
    UnknownModelError,
)

if TYPE_CHECKING:
    from trident.client import AsyncClient, Client, GenerateResult, ProgressEvent

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "CancelledError",
    "Client",
    "ConfigError",
    "GenerateResult",
    "InvalidRequestError",
    "ModelError",
    "OutOfMemoryError",
    "OverloadedError",
    "ProgressEvent",
    "ProtocolError",
    "RequestError",
    "RequestTimeoutError",
    "StageFailedError",
    "TridentError",
    "UnknownModelError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The client pulls in zmq/numpy; keep `import trident.errors` light for workers.
    if name in ("Client", "AsyncClient", "GenerateResult", "ProgressEvent"):
        from trident import client

        return getattr(client, name)
    raise AttributeError(f"module 'trident' has no attribute {name!r}")
