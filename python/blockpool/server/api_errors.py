"""Errors the server answers with, as OpenAI's and Anthropic's clients expect them.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``.
Anthropic (``/v1/messages``): ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

#: HTTP status -> Anthropic's error type.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """An error to answer a request with.

    Args:
        status: The HTTP status.
        message: What was wrong, for the user.
        kind: OpenAI's error ``type`` (``invalid_request_error``, ...).
        param: The request field at fault, if one is.
        code: A machine-readable code (``model_not_found``, ...).
        headers: Extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        """The body OpenAI's API sends for this error."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """The body Anthropic's API sends for this error."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


def from_validation(error: ValidationError) -> ApiError:
    """A 400 naming each field a request body got wrong."""
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_LABELS)))
        problems.append(f"{where or 'body'}: {item['msg']}")
    first = error.errors()[0]["loc"] if error.errors() else ()
    return bad_request("invalid request: " + "; ".join(dict.fromkeys(problems)), param=str(first[0]) if first else None)


# pydantic puts the union member it tried into the location ("str", "list[str]"): not a field name.
_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-plain"}
