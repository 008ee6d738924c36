"""Admin product writes: ``POST /v1/products`` (add or update one product) and ``DELETE``.

Body of ``POST /v1/products`` (``application/json`` only; unknown fields are refused)::
    {"product_id": "sku-1",            # required, 1..1024 characters, not blank, valid Unicode
                                       # (no lone surrogate), no control characters
     "image_base64": "...",            # required: the product's image (becomes its only image)
     "category": "shoes",              # optional, 1..200 characters, or null
     "metadata": {"title": "..."}}     # optional JSON object, at most 64 KiB encoded

The image is decoded with the same limits as a query (422 undecodable, 413 over the pixel
limit), embedded with the catalog path (``embed_catalog``: best detected region), and written to
the store by :mod:`serve.store_writer`, which saves it as ``STORE/uploads/<sha256>.<ext>`` (so
the image endpoint serves only files the store knows) under the store's lock, and removes it
again when the write fails: an error stores nothing. The product's other images are
tombstoned. The caller's process applies the updates log before answering, so the next query
(to any worker) sees it. Answers 201 for a new product, 200 for an update.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from flask import Request
from PIL import Image

from embed.image_io import decode_image
from index.store.ownership import UPLOADS_DIR
from serve.errors import ApiError
from serve.requests import check_text, json_body, parse_category, reject_unknown, shown
from serve.store_writer import run_writer

PRODUCT_FIELDS = frozenset({"product_id", "image_base64", "category", "metadata"})
MAX_PRODUCT_ID = 1024
MAX_METADATA_BYTES = 64 * 1024
# Control characters a product_id must not hold: C0 (below 0x20) and DEL + C1 (0x7F..0x9F), [lo, hi).
CONTROL_CHARACTERS = ((0x00, 0x20), (0x7F, 0xA0))
UPLOADS = UPLOADS_DIR
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


def parse_product_id(raw) -> str:
    if not isinstance(raw, str):
        raise ApiError(400, "bad_product_id", f"product_id must be a string, got {shown(raw)}")
    if not raw.strip() or len(raw) > MAX_PRODUCT_ID:
        raise ApiError(400, "bad_product_id", f"product_id must be 1..{MAX_PRODUCT_ID} characters and not blank, got {shown(raw)}")
    if any(lo <= ord(c) < hi for c in raw for lo, hi in CONTROL_CHARACTERS):
        raise ApiError(400, "bad_product_id", f"product_id must not contain control characters, got {shown(raw)}")
    check_text(raw, "product_id", "bad_product_id")
    return raw


def parse_metadata(raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError(400, "bad_metadata", f"metadata must be a JSON object, got {shown(raw)}")
    try:
        size = len(json.dumps(raw, ensure_ascii=False).encode())
    except UnicodeEncodeError as exc:
        raise ApiError(400, "bad_metadata", f"metadata holds a string that is not valid Unicode "
                       f"(a lone surrogate: {shown(exc.object[exc.start:exc.end])})") from None
    except (RecursionError, ValueError) as exc:
        raise ApiError(400, "bad_metadata", f"metadata cannot be stored as JSON: {exc}") from None
    if size > MAX_METADATA_BYTES:
        raise ApiError(400, "bad_metadata", f"metadata is {size} bytes encoded, over the limit of {MAX_METADATA_BYTES}")
    return raw


def _image_bytes(raw) -> bytes:
    if not isinstance(raw, str):
        raise ApiError(400, "bad_base64", f"image_base64 must be a string, got {shown(raw)}")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"image_base64 is not valid base64 (starts {shown(raw[:20])})") from None


def parse_product_body(request: Request) -> dict:
    if (request.mimetype or "") != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {request.mimetype or '(none)'!r} is not supported; send application/json")
    body = json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object with 'product_id' and 'image_base64'")
    reject_unknown(body, PRODUCT_FIELDS)
    for name in ("product_id", "image_base64"):
        if name not in body:
            raise ApiError(400, "missing_field", f"field {name!r} is required")
    return {
        "product_id": parse_product_id(body["product_id"]),
        "image": _image_bytes(body["image_base64"]),
        "category": parse_category(body.get("category")),
        "metadata": parse_metadata(body.get("metadata")),
    }


def _upload_target(store_path: Path, data: bytes) -> tuple[str, Path, str]:
    """(image name relative to the store, absolute path, sha256) where the bytes are to be saved.

    The writer child saves them there, under the store's lock, only as part of the write."""
    digest = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as probe:  # already decoded once: only the format is read
        ext = EXTENSIONS.get(probe.format or "", "img")
    path = Path(store_path).resolve() / UPLOADS / f"{digest}.{ext}"
    return f"{UPLOADS}/{path.name}", path, digest


def writable_live(service):
    live = service.live()
    if live is None:
        raise ApiError(503, "not_ready", service.not_ready_reason())
    if live.sharded or service.updates is None:
        raise ApiError(501, "not_supported", "this server cannot take live updates (a shard front or read-only server); "
                       "write the store and rebuild")
    return live


def put_product(service, request: Request) -> tuple[dict, int]:
    live = writable_live(service)
    fields = parse_product_body(request)
    with service.decode_budget.hold(fields["image"]):  # the same pixel budget as queries
        with service._stage("decode"):
            image = decode_image(fields["image"])
        vector = np.asarray(service.embedder().embed_catalog([image]), dtype=np.float32)[0]
        del image
    if vector.shape[0] != live.dim:
        raise ApiError(500, "dimension_mismatch", f"the embedder makes {vector.shape[0]}-d vectors, the index holds {live.dim}-d")
    name, path, digest = _upload_target(service.store_path, fields["image"])
    record = {"product_id": fields["product_id"], "image": name, "path": str(path), "category": fields["category"],
              "metadata": fields["metadata"], "content_hash": digest}
    upload = {"path": str(path), "image_base64": base64.b64encode(fields["image"]).decode()}
    result = run_writer(service.store_path, {"op": "put_product", "record": record, "vector": vector.tolist(),
                                             "upload": upload})
    service.catch_up()
    if service.metrics is not None:
        service.metrics.live_updates.labels("put").inc()
    body = {"index_version": live.version, "item_id": str(result["item_id"]), "replaced_images": len(result["delete"]),
            "product": service.product(fields["product_id"])}
    return body, 201 if result["created"] else 200


def delete_product(service, product_id: str) -> dict:
    live = writable_live(service)
    service.product(product_id)  # 404 naming the id when unknown (or already deleted)
    result = run_writer(service.store_path, {"op": "delete_product", "product_id": product_id})
    if not result["deleted"]:
        raise ApiError(404, "unknown_product", f"no product with id {product_id!r}")
    service.catch_up()
    if service.metrics is not None:
        service.metrics.live_updates.labels("delete").inc()
    return {"index_version": live.version, "product_id": product_id, "deleted_images": result["deleted"]}
