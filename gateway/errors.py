"""The GatewayError tree: every failure the gateway reports, with its status and OpenAI error shape."""

from __future__ import annotations

from collections.abc import Mapping

import orjson


class GatewayError(Exception):
    """Base of every error the gateway renders to a client as OpenAI error JSON."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers) if headers else {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


# ---- client errors (4xx) -------------------------------------------------------------------


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    retryable = True


# ---- upstream / server errors (5xx) ---------------------------------------------------------


class UpstreamError(GatewayError):
    """The provider answered with an error; status and body are the provider's, normalised."""

    type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        raw_body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, status=status, headers=headers, param=param, code=code)
        self.raw_body = raw_body
        self.retryable = status == 429 or status >= 500

    def body(self) -> bytes:
        if self.raw_body is not None:
            return self.raw_body
        return super().body()


class BadGateway(GatewayError):
    status = 502
    type = "server_error"
    code = "bad_gateway"
    retryable = True


class UpstreamUnavailable(BadGateway):
    code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"
    retryable = True


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
    retryable = True


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"
