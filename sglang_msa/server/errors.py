"""The memory API's refusals: HTTP status, message, and the request field at fault."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """A refused memory operation: HTTP status, message, and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body())
