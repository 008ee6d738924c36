"""Validation of HTTP request bodies, at the boundary, with messages that name the bad value."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass

import numpy as np
from flask import Request

from index.ann.limits import MAX_K
from serve.errors import ApiError, ClientTooSlow

DEFAULT_K = 10
MAX_CATEGORY_LENGTH = 200
SEARCH_FIELDS_JSON = frozenset({"image_base64", "vector", "k", "category", "box"})
SEARCH_FIELDS_FORM = frozenset({"k", "category", "box"})
BOX_LENGTH = 4  # x1, y1, x2, y2


@dataclass(frozen=True)
class SearchRequest:
    k: int
    category: str | None
    image: bytes | None = None
    vector: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None  # pixels of the uploaded photo: search that region


def shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_k(raw) -> int:
    if raw is None:
        return DEFAULT_K
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ApiError(400, "bad_k", f"k must be an integer in 1..{MAX_K}, got {shown(raw)}")
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(400, "bad_k", f"k must be an integer in 1..{MAX_K}, got {shown(raw)}") from None
    if not 1 <= k <= MAX_K:
        raise ApiError(400, "k_out_of_range", f"k must be in 1..{MAX_K}, got {k}")
    return k


def check_text(raw: str, field: str, code: str) -> str:
    """``raw`` is valid Unicode: JSON's ``\\ud800`` escapes decode to lone surrogates, which no
    UTF-8 store (or response) can hold."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, code, f"{field} must be valid Unicode; character {exc.start} is a lone surrogate "
                       f"{shown(raw[exc.start])}, in {shown(raw)}") from None
    return raw


def parse_category(raw) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ApiError(400, "bad_category", f"category must be a string, got {shown(raw)}")
    if not 0 < len(raw) <= MAX_CATEGORY_LENGTH:
        raise ApiError(400, "bad_category", f"category must be 1..{MAX_CATEGORY_LENGTH} characters, got {len(raw)}")
    return check_text(raw, "category", "bad_category")


def parse_vector(raw, dim: int) -> np.ndarray:
    if not isinstance(raw, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
        raise ApiError(400, "bad_vector", f"vector must be a list of {dim} numbers, got {shown(raw)}")
    if len(raw) != dim:
        raise ApiError(400, "bad_vector_length", f"vector must have {dim} numbers, got {len(raw)}")
    bad = next((i for i, x in enumerate(raw) if not _fits_float32(x)), None)
    if bad is not None:
        raise ApiError(400, "bad_vector_value", f"vector[{bad}] is {shown(raw[bad], 40)}; every value must be finite "
                       f"and within float32's range (|x| <= {FLOAT32_MAX:.4g})")
    return np.asarray(raw, dtype=np.float32)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fits_float32(x) -> bool:
    """Finite, and still finite as float32 (a JSON integer of 400 digits, or 1e39, is not)."""
    try:
        value = float(x)
    except OverflowError:
        return False
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _box_error(raw, why: str) -> ApiError:
    return ApiError(400, "bad_box", f"box {shown(raw)} {why}; give [x1, y1, x2, y2] in pixels of the photo, x1 < x2, y1 < y2")


def parse_box(raw) -> tuple[float, float, float, float] | None:
    """A request's ``box`` (a JSON list, or a multipart text: JSON or comma-separated), checked
    for shape alone: the photo's size is known only after decoding (:func:`check_box_inside`)."""
    if raw is None:
        return None
    values = raw
    if isinstance(raw, str):
        text = raw.strip()
        try:
            values = json.loads(text) if text.startswith("[") else [_number_text(part) for part in text.split(",")]
        except (ValueError, RecursionError):
            raise _box_error(raw, f"is not {BOX_LENGTH} numbers") from None
    if not isinstance(values, list) or len(values) != BOX_LENGTH:
        raise _box_error(raw, f"is not {BOX_LENGTH} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise _box_error(raw, "holds something that is not a number")
    if not all(_fits_float32(v) for v in values):
        raise _box_error(raw, "holds a value that is not finite")
    x1, y1, x2, y2 = (float(v) for v in values)
    if x2 == x1 or y2 == y1:
        raise _box_error(raw, "has zero area")
    if x2 < x1 or y2 < y1:
        raise _box_error(raw, "is inverted (x2 < x1 or y2 < y1)")
    return x1, y1, x2, y2


def _number_text(part: str) -> float:
    """One comma-separated number: Python's float() also takes 'nan', 'inf' and '1_0'; those are refused after."""
    if "_" in part:
        raise ValueError(part)
    return float(part)


def check_box_inside(box: tuple[float, float, float, float], width: int, height: int) -> None:
    """After decoding (and EXIF orientation): the box lies within the photo, edges included."""
    x1, y1, x2, y2 = box
    if min(box) < 0 or x2 > width or y2 > height:
        shown_box = "[" + ", ".join(f"{v:g}" for v in box) + "]"
        raise ApiError(400, "bad_box", f"box {shown_box} is outside the {width}x{height} photo "
                       f"(as oriented by its EXIF tag): every coordinate must be in 0..width / 0..height")


def reject_unknown(fields, allowed: frozenset[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")


def buffer_body(request: Request, limit: int) -> None:
    """Read the request body here, once: at most ``limit`` + 1 bytes, so a chunked body over the
    limit is a 413 (a declared Content-Length over it was refused before). The routes then
    parse it from memory, as a body of known length. A body that stops arriving by the
    server's deadline is a 408 (:class:`ClientTooSlow`); a malformed chunked one a 400."""
    environ = request.environ
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not chunked and not request.content_length:
        return
    want = limit + 1 if chunked else min(request.content_length, limit + 1)
    parts, size = [], 0
    try:
        while size < want:
            part = environ["wsgi.input"].read(min(1 << 16, want - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    except (ClientTooSlow, ApiError):
        raise
    except Exception as exc:  # noqa: BLE001 - the server's chunk parser or a dropped connection
        raise ApiError(400, "bad_body", f"the request body could not be read: {type(exc).__name__}: {shown(str(exc))}") from None
    if size > limit:
        raise ApiError(413, "body_too_large", f"request body (chunked) is over the limit of {limit} bytes")
    if not chunked and size < request.content_length:
        raise ApiError(400, "bad_body", f"the request body ended after {size} of its {request.content_length} bytes")
    environ["wsgi.input"] = io.BytesIO(b"".join(parts))
    environ["CONTENT_LENGTH"] = str(size)
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    environ.pop("wsgi.input_terminated", None)
    request.content_length = size  # werkzeug caches the header's (absent) value


def json_body(request: Request):
    """The parsed JSON body, or None when it is not JSON; a body nested too deeply for the
    parser is a 400, not an internal error."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        raise ApiError(400, "bad_json", "the JSON body is nested too deeply to parse") from None


def _parse_json(request: Request, dim: int) -> SearchRequest:
    body = json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object with 'image_base64' or 'vector'")
    reject_unknown(body, SEARCH_FIELDS_JSON)
    k, category = parse_k(body.get("k")), parse_category(body.get("category"))
    has_image, has_vector = "image_base64" in body, "vector" in body
    if has_image == has_vector:
        raise ApiError(400, "bad_query", "give exactly one of 'image_base64' and 'vector'")
    if has_vector:
        if body.get("box") is not None:
            raise ApiError(400, "bad_box", f"box {shown(body['box'])} applies to image queries only, not to a vector query")
        return SearchRequest(k, category, vector=parse_vector(body["vector"], dim))
    box = parse_box(body.get("box"))
    encoded = body["image_base64"]
    if not isinstance(encoded, str):
        raise ApiError(400, "bad_base64", f"image_base64 must be a string, got {shown(encoded)}")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"image_base64 is not valid base64 (starts {shown(encoded[:20])})") from None
    return SearchRequest(k, category, image=data, box=box)


def _parse_multipart(request: Request) -> SearchRequest:
    reject_unknown(request.form, SEARCH_FIELDS_FORM)
    reject_unknown(request.files, frozenset({"image"}))
    if "image" not in request.files:
        raise ApiError(400, "missing_image", "multipart body needs an 'image' file field")
    k, category, box = parse_k(request.form.get("k")), parse_category(request.form.get("category")), parse_box(request.form.get("box"))
    return SearchRequest(k, category, image=request.files["image"].read(), box=box)


def parse_search_request(request: Request, dim: int) -> SearchRequest:
    mimetype = request.mimetype or ""
    if mimetype == "application/json":
        return _parse_json(request, dim)
    if mimetype == "multipart/form-data":
        return _parse_multipart(request)
    raise ApiError(
        415, "unsupported_media_type",
        f"Content-Type {mimetype or '(none)'!r} is not supported; send multipart/form-data or application/json",
    )
