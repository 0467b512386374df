"""Errors the engine deployment raises for a bad request, mapped by the ingress to HTTP.

``BadRequest`` carries an HTTP status (400 malformed body or too-long prompt, 404 unknown
model) and a message meant for the client. It survives Ray's serialization: a replica
raising it reaches the caller of ``handle.chat.remote(...)`` as an exception that is still
an instance of ``BadRequest`` (Ray's ``RayTaskError`` subclasses the cause's type), with
``status`` and ``message`` intact. A replica never crashes on a bad body.
"""

from __future__ import annotations


class BadRequest(Exception):
    """A client error: ``status`` (4xx) and a human-readable ``message``."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(status, message, param)
        self.status = int(status)
        self.message = str(message)
        self.param = param

    def __reduce__(self):
        return (_rebuild_bad_request, (self.status, self.message, self.param))

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    def to_openai(self) -> dict:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                422: "invalid_request_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def _rebuild_bad_request(status: int, message: str, param: str | None) -> BadRequest:
    return BadRequest(status, message, param=param)


def find_bad_request(exc: BaseException) -> BadRequest | None:
    """The ``BadRequest`` inside ``exc`` (itself, a Ray wrapper of it, or its cause)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, BadRequest):
            return exc
        cause = getattr(exc, "cause", None)  # RayTaskError.cause
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
        seen += 1
    return None
