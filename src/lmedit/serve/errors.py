"""Errors the server turns into JSON responses: ``{"error": {"message", "type", "code"}}`` with the status."""

from __future__ import annotations


class ServeError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, the message says what to fix."""

    status = 400
    type = "invalid_request_error"


class BadRequest(ServeError):
    status = 400


class NotFound(ServeError):
    status = 404
    type = "not_found_error"


class Conflict(ServeError):
    status = 409
    type = "conflict_error"


class TooBusy(ServeError):
    status = 429
    type = "rate_limit_error"


class Unavailable(ServeError):
    """The server lacks something it needs (a data file); the message says what to install or set."""

    status = 503
    type = "server_error"
