"""The OpenAPI 3.1 document of the running server (``GET /openapi.json``), built per request.

Every limit in it is read from the constant or the object the request validation itself uses
(``MAX_K``, the app's body limit, the live index's dimension, the shard call limits, the product
id rules, ...), and its paths are the app's registered routes: an operation is listed only where
``app.url_map`` has its rule, so a shard server's document has ``/v1/shard/search`` and no other
server's does. A route without an entry in ``_OPERATIONS`` is left out of the document; the
tests compare the document's operations with ``app.url_map`` so that cannot ship unnoticed.
"""

from __future__ import annotations

import re

from flask import Flask

import imgsearch
from embed.image_io import DEFAULT_MAX_PIXELS, BadImage, ImageTooLarge
from index.ann.limits import MAX_K
from serve.products import CONTROL_CHARACTERS, MAX_METADATA_BYTES, MAX_PRODUCT_ID, PRODUCT_FIELDS
from serve.requests import (
    BOX_LENGTH,
    DEFAULT_K,
    FLOAT32_MAX,
    MAX_CATEGORY_LENGTH,
    SEARCH_FIELDS_FORM,
    SEARCH_FIELDS_JSON,
)
from serve.shards import DEFAULT_SHARD_TOKEN_ENV, MAX_SHARD_CANDIDATES, MAX_SHARD_ROWS, SHARD_SEARCH_FIELDS
from serve.worker import head_limits

OPENAPI_VERSION = "3.1.0"
_METHODS = ("get", "post", "put", "patch", "delete")
_CONVERTED = re.compile(r"<(?:([a-z_]+):)?([A-Za-z_][A-Za-z0-9_]*)>")
_ERROR = {"$ref": "#/components/schemas/Error"}


def product_id_pattern() -> str:
    """An ECMA-262 pattern (JSON Schema's regex dialect) refusing the control characters that
    :func:`serve.products.parse_product_id` refuses. A lookahead, not ``^[^...]*$``: Python's
    ``$`` (jsonschema's) also matches before a final newline, so that form would let "a\\n" pass."""
    ranges = "".join(f"\\u{lo:04x}-\\u{hi - 1:04x}" for lo, hi in CONTROL_CHARACTERS)
    return f"^(?![\\s\\S]*[{ranges}])"


def openapi_path(rule: str) -> str:
    """A werkzeug rule (``/v1/products/<path:product_id>``) as an OpenAPI path (``/v1/products/{product_id}``)."""
    return _CONVERTED.sub(r"{\2}", rule)


def _path_parameter(converter: str, name: str) -> dict:
    param = {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
    if converter == "path":
        param["description"] = "may contain '/' (sent as is, or percent-encoded)"
    return param


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _ok(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
    answer: dict = {"description": description}
    if schema is not None:
        answer["content"] = {media: {"schema": schema}}
    return answer


def _errors(**by_status: str) -> dict:
    """Error answers: status -> the codes and when (``s400="bad_k: ..."``)."""
    return {status[1:]: {"description": text, "content": _json(_ERROR)} for status, text in by_status.items()}


def _fields(allowed: frozenset[str], schemas: dict[str, dict]) -> dict[str, dict]:
    """The schemas of exactly the fields the validation accepts (``allowed``), in a stable order."""
    missing = sorted(set(allowed) - set(schemas))
    if missing:
        raise KeyError(f"the OpenAPI document has no schema for request field(s) {', '.join(missing)}")
    return {name: schemas[name] for name in sorted(allowed)}


def _limits(app: Flask, service) -> dict:
    live = service.live()
    budget = getattr(service, "decode_budget", None)
    return {
        "max_k": MAX_K,
        "default_k": DEFAULT_K,
        "max_body_bytes": app.config["MAX_CONTENT_LENGTH"],
        "dim": live.dim if live is not None else None,
        "max_category_length": MAX_CATEGORY_LENGTH,
        "max_image_pixels": budget.max_pixels if budget is not None else DEFAULT_MAX_PIXELS,
        "decode_pixel_budget": budget.pixels if budget is not None else None,
        "max_product_id_length": MAX_PRODUCT_ID,
        "max_metadata_bytes": MAX_METADATA_BYTES,
        "max_shard_vectors": MAX_SHARD_ROWS,
        "max_shard_candidates": MAX_SHARD_CANDIDATES,
        **head_limits(),
    }


def _schemas(lim: dict) -> dict:
    dim = lim["dim"]
    vector: dict = {"type": "array", "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX},
                    "description": "a query vector: finite numbers within float32's range"
                                   + (f", exactly {dim} of them (the live index's dimension)" if dim else
                                      "; its length is the live index's dimension (no index is loaded now)")}
    if dim:
        vector["minItems"] = vector["maxItems"] = dim
    k = {"type": "integer", "minimum": 1, "maximum": lim["max_k"], "default": lim["default_k"],
         "description": "how many distinct products to return"}
    category = {"type": ["string", "null"], "minLength": 1, "maxLength": lim["max_category_length"],
                "description": "only results of this category (valid Unicode)"}
    image_base64 = {"type": "string", "contentEncoding": "base64", "maxLength": lim["max_body_bytes"],
                    "description": f"the photo's bytes in base64; at most {lim['max_image_pixels']:,} pixels"}
    box_rule = ("[x1, y1, x2, y2] in pixels of the uploaded photo (after its EXIF orientation), 0 <= x1 < x2 <= width, "
                "0 <= y1 < y2 <= height: search that region (cropped with the usual 10% margin) instead of the detector's choice; "
                "400 bad_box otherwise")
    search_json = _fields(SEARCH_FIELDS_JSON, {
        "image_base64": image_base64, "vector": vector, "k": k, "category": category,
        "box": {"type": "array", "items": {"type": "number"}, "minItems": BOX_LENGTH, "maxItems": BOX_LENGTH,
                "description": box_rule + "; image queries only (400 bad_box with a vector)"},
    })
    search_form = _fields(SEARCH_FIELDS_FORM | {"image"}, {
        "image": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                  "description": f"the photo file; at most {lim['max_image_pixels']:,} pixels"},
        "k": k, "category": {**category, "type": "string"},
        "box": {"type": "string", "description": f"JSON text [x1, y1, x2, y2] or {BOX_LENGTH} comma-separated numbers: " + box_rule},
    })
    product_id = {"type": "string", "minLength": 1, "maxLength": lim["max_product_id_length"],
                  "pattern": product_id_pattern(),
                  "description": "the user's product id: not blank, valid Unicode (no lone surrogate), no control characters"}
    region = {"type": "object", "required": ["box", "score"], "properties": {
        "box": {"type": "array", "items": {"type": "number"}, "minItems": BOX_LENGTH, "maxItems": BOX_LENGTH,
                "description": "[x1, y1, x2, y2]: integer pixels of the uploaded photo (a request's box: as given)"},
        "score": {"type": "number"}, "source": {"type": "string"}}}
    result = {"type": "object", "required": ["product_id", "score", "category", "image", "metadata"], "properties": {
        "product_id": {"type": "string"}, "score": {"type": "number", "description": "ip: higher is better; l2: squared distance, lower is better"},
        "category": {"type": ["string", "null"]}, "image": {"type": "string"}, "metadata": {"type": "object"}}}
    return {
        "Error": {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
            "error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "pattern": "^[a-z0-9_]+$", "description": "snake_case, for programs"},
                "message": {"type": "string", "description": "a human sentence quoting the bad value"}}}}},
        "SearchJson": {"type": "object", "additionalProperties": False, "properties": search_json,
                       "oneOf": [{"required": ["image_base64"]}, {"required": ["vector"]}],
                       "description": "exactly one of image_base64 and vector"},
        "SearchMultipart": {"type": "object", "additionalProperties": False, "required": ["image"], "properties": search_form},
        "Region": region,
        "Result": result,
        "SearchResponse": {"type": "object", "required": ["index_version", "took_ms", "detections", "results"], "properties": {
            "index_version": {"type": "string"}, "took_ms": {"type": "number"},
            "detections": {"type": "array", "items": {"$ref": "#/components/schemas/Region"}},
            "region": {"$ref": "#/components/schemas/Region", "description": "image queries: the region the results are for"},
            "partial": {"type": "boolean", "description": "shard fronts: some shard server did not answer"},
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"},
                        "description": "distinct products, best first"}}},
        "ProductPut": {"type": "object", "additionalProperties": False, "required": ["product_id", "image_base64"],
                       "properties": _fields(PRODUCT_FIELDS, {
                           "product_id": product_id, "image_base64": {**image_base64, "description": "the product's image (becomes its only image)"},
                           "category": category,
                           "metadata": {"type": ["object", "null"], "description": f"at most {lim['max_metadata_bytes']:,} bytes encoded as JSON"}})},
        "Product": {"type": "object", "required": ["product_id", "category", "metadata", "images"], "properties": {
            "product_id": {"type": "string"}, "category": {"type": ["string", "null"]}, "metadata": {"type": "object"},
            "images": {"type": "array", "items": {"type": "object", "properties": {
                "image": {"type": "string"}, "content_hash": {"type": "string"}, "updated_at": {}}}}}},
        "ShardSearch": {"type": "object", "additionalProperties": False, "required": ["vectors", "k"],
                        "properties": _fields(SHARD_SEARCH_FIELDS, {
                            "vectors": {"type": "array", "minItems": 1, "maxItems": lim["max_shard_vectors"], "items": vector,
                                        "description": f"at most {lim['max_shard_vectors']} vectors, and vectors x k at most "
                                                       f"{lim['max_shard_candidates']:,}"},
                            "k": k, "category": category})},
        "ShardResponse": {"type": "object", "required": ["index_version", "shard", "ids", "scores"], "properties": {
            "index_version": {"type": "string"}, "shard": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
            "ids": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}, "description": "-1 pads"},
            "scores": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}},
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _operations(lim: dict) -> dict[tuple[str, str], dict]:
    """(Flask endpoint, method) -> the operation."""
    body = f"at most {lim['max_body_bytes']:,} bytes"
    not_ready = "not_ready: no index version is loaded"
    admin_errors = dict(s401="missing_token: no 'Authorization: Bearer' header",
                        s403="admin_disabled: the server has no admin token; wrong_token")
    image_errors = dict(s413=f"body_too_large: body over {body}; {ImageTooLarge.code}: image over "
                             f"{lim['max_image_pixels']:,} pixels",
                        s422=f"{BadImage.code}: the image cannot be decoded")
    k_codes = f"bad_k / k_out_of_range: k not an integer in 1..{lim['max_k']}; bad_category; unknown_field"
    return {
        ("page", "get"): {"summary": "The web page: upload a photo, see the matching products", "tags": ["pages"],
                          "responses": {"200": _ok("HTML", {"type": "string"}, "text/html")}},
        ("docs", "get"): {"summary": "This API reference as a web page (reads /openapi.json)", "tags": ["pages"],
                          "responses": {"200": _ok("HTML", {"type": "string"}, "text/html")}},
        ("openapi", "get"): {"summary": "This OpenAPI document, with the running server's limits", "tags": ["pages"],
                             "responses": {"200": _ok("the document", {"type": "object"})}},
        ("healthz", "get"): {"summary": "The process is alive", "tags": ["operations"], "responses": {
            "200": _ok("alive", {"type": "object", "properties": {"status": {"const": "ok"}}})}},
        ("readyz", "get"): {"summary": "Ready once an index version is loaded", "tags": ["operations"], "responses": {
            "200": _ok("ready", {"type": "object", "properties": {
                "status": {"const": "ready"}, "index_version": {"type": "string"}, "ntotal": {"type": "integer"},
                "dim": {"type": "integer"}, "metric": {"enum": ["ip", "l2"]}}}),
            **_errors(s503=not_ready)}},
        ("model", "get"): {"summary": "The live version's model and the demo's background training", "tags": ["operations"],
                           "responses": {"200": _ok("the model", {"type": "object", "properties": {
                               "model": {"type": ["string", "null"]}, "kind": {"enum": ["pretrained", "trained", "unknown"]},
                               "index_version": {"type": ["string", "null"]}, "index_model": {"type": ["string", "null"]},
                               "training": {"type": ["object", "null"]}}})}},
        ("prometheus_metrics", "get"): {"summary": "Prometheus metrics", "tags": ["operations"],
                                        "responses": {"200": _ok("Prometheus text format", {"type": "string"}, "text/plain")}},
        ("search", "post"): {
            "summary": "Search by photo (multipart or base64) or by vector", "tags": ["search"],
            "description": f"The body is {body}. Results are distinct products, best first.",
            "requestBody": {"required": True, "description": body, "content": {
                "multipart/form-data": {"schema": _ref("SearchMultipart")},
                "application/json": {"schema": _ref("SearchJson")}}},
            "responses": {"200": _ok("the results", _ref("SearchResponse")), **_errors(
                s400=f"{k_codes}; bad_json; bad_query: not exactly one of image_base64 and vector; bad_base64; "
                     f"missing_image; bad_vector / bad_vector_length: not {lim['dim'] or 'dim'} numbers; "
                     "bad_vector_value: NaN, infinite or beyond float32; "
                     f"bad_box: not {BOX_LENGTH} finite numbers, zero-area, inverted, outside the photo, or given with a vector",
                s413=image_errors["s413"], s415="unsupported_media_type: not multipart/form-data or application/json",
                s422=image_errors["s422"],
                s503=f"{not_ready}; busy (with Retry-After): the decode budget of {lim['decode_pixel_budget'] or 0:,} "
                     "pixels in flight had no room for this image")}},
        ("product", "get"): {"summary": "A product's stored record", "tags": ["products"], "responses": {
            "200": _ok("the record", _ref("Product")), **_errors(s404="unknown_product")}},
        ("product_image", "get"): {
            "summary": "The bytes of one of the product's stored images", "tags": ["products"],
            "description": "Served only while the stored path is a regular file reached without a symlink and its "
                           "sha256 is the stored content_hash. Answers carry an ETag (304 to a matching If-None-Match).",
            "parameters": [{"name": "image", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "which stored image (its `image` name); default the first"}],
            "responses": {"200": _ok("the image file", {"type": "string", "format": "binary"}, "image/*"),
                          "304": {"description": "not modified (If-None-Match)"},
                          **_errors(s404="unknown_product; unknown_image; image_missing",
                                    s409="image_changed: the file changed on disk since it was stored")}},
        ("put_product", "post"): {
            "summary": "Add or update one product (searchable at once)", "tags": ["admin"],
            "security": [{"adminBearer": []}],
            "requestBody": {"required": True, "description": body, "content": _json(_ref("ProductPut"))},
            "responses": {"200": _ok("updated", {"type": "object"}), "201": _ok("created", {"type": "object"}), **_errors(
                s400="bad_product_id; bad_base64; bad_category; bad_metadata; missing_field; unknown_field; bad_json",
                **admin_errors, **image_errors, s415="unsupported_media_type: not application/json",
                s501="not_supported: a shard front or read-only server", s503=not_ready)}},
        ("delete_product", "delete"): {
            "summary": "Remove one product (gone from results at once)", "tags": ["admin"],
            "security": [{"adminBearer": []}],
            "responses": {"200": _ok("deleted", {"type": "object"}), **_errors(
                **admin_errors, s404="unknown_product", s501="not_supported: a shard front or read-only server",
                s503=not_ready)}},
        ("reload", "post"): {
            "summary": "Switch to the version CURRENT names, with no failed request", "tags": ["admin"],
            "security": [{"adminBearer": []}], "description": "Takes no body.",
            "responses": {"200": _ok("the version now served", {"type": "object", "properties": {
                "index_version": {"type": "string"}, "previous_version": {"type": ["string", "null"]},
                "ntotal": {"type": "integer"}, "shards": {}}}),
                **_errors(s400="unexpected_body: a body was sent", **admin_errors)}},
        ("shard_search", "post"): {
            "summary": "A shard server's raw candidates (shard servers only)", "tags": ["shards"],
            "security": [{"shardBearer": []}],
            "requestBody": {"required": True, "description": body, "content": _json(_ref("ShardSearch"))},
            "responses": {"200": _ok("candidates, -1 padded", _ref("ShardResponse")), **_errors(
                s400=f"bad_vectors; bad_vector / bad_vector_length / bad_vector_value; {k_codes}; bad_json",
                s401="missing_token: no 'Authorization: Bearer' header",
                s403="shard_disabled: the server has no shard token; wrong_token",
                s413=f"too_many_vectors: over {lim['max_shard_vectors']}; too_many_candidates: vectors x k over "
                     f"{lim['max_shard_candidates']:,}; body_too_large",
                s415="unsupported_media_type: not application/json", s503=not_ready)}},
    }


def openapi_document(app: Flask, *, admin_token_env: str, shard_token_env: str | None = None) -> dict:
    """The document for ``app`` as it is now (its routes, its body limit, its live index)."""
    lim = _limits(app, app.extensions["imgsearch"]["service"])
    operations = _operations(lim)
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        for method in sorted(m.lower() for m in rule.methods or ()):
            operation = operations.get((rule.endpoint, method)) if method in _METHODS else None
            if operation is None:
                continue
            operation = {"operationId": f"{rule.endpoint}", **operation}
            params = [_path_parameter(converter, name) for converter, name in _CONVERTED.findall(rule.rule)]
            if params:
                operation["parameters"] = params + operation.get("parameters", [])
            operation["responses"] = {**operation["responses"], "default": {
                "description": "any other error, e.g. 400 bad_http_request, 408 request_timeout, 413 body_too_large, "
                               f"414 uri_too_long (request line over {lim['max_request_line_bytes']:,} bytes), "
                               f"431 header_fields_too_large (over {lim['max_header_fields']} fields or a field over "
                               f"{lim['max_header_field_bytes']:,} bytes), 500 internal_error",
                "content": _json(_ERROR)}}
            paths.setdefault(openapi_path(rule.rule), {})[method] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "imgsearch", "version": imgsearch.__version__,
                 "description": "Image similarity search. Every error answer has the body "
                                '{"error": {"code", "message"}}. x-limits are this server\'s.',
                 "x-limits": lim},
        "paths": paths,
        "components": {
            "schemas": _schemas(lim),
            "securitySchemes": {
                "adminBearer": {"type": "http", "scheme": "bearer",
                                "description": f"the value of ${admin_token_env} on the server (unset: admin endpoints answer 403)"},
                "shardBearer": {"type": "http", "scheme": "bearer",
                                "description": f"the shard token, ${shard_token_env or DEFAULT_SHARD_TOKEN_ENV} on shard servers and fronts"},
            },
        },
    }
