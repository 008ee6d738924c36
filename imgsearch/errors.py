"""Exceptions that cross package boundaries and map to CLI exit codes and HTTP statuses."""


class ImgsearchError(Exception):
    """Base class. ``code`` is the snake_case error code used in HTTP error bodies."""

    code = "error"
    http_status = 500
    exit_status = 1


class BadInput(ImgsearchError, ValueError):
    """The caller gave something invalid (a field, a file, an argument)."""

    code = "bad_input"
    http_status = 400
    exit_status = 2


class MissingAsset(ImgsearchError, FileNotFoundError):
    """A required local file (weights, data set) is absent."""

    code = "missing_asset"
    http_status = 503
    exit_status = 1


class JobFailed(ImgsearchError):
    """A long job ran and failed (validation, I/O)."""

    code = "job_failed"
    exit_status = 1


class NotImplementedYet(ImgsearchError):
    code = "not_implemented"
    http_status = 501
    exit_status = 1
