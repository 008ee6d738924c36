"""Admin endpoints: ``POST /v1/products``, ``DELETE /v1/products/<id>``, ``POST /v1/admin/reload``.

They need ``Authorization: Bearer <token>``, the token being the value of the environment
variable ``IMGSEARCH_ADMIN_TOKEN`` (``imgsearch serve --admin-token-env`` names another).
Unset or empty: every admin call answers 403 ``admin_disabled``. No header or not a Bearer
header: 401 ``missing_token``. Another token: 403 ``wrong_token``. The token is checked before
the body is read, and compared in constant time.
"""

from __future__ import annotations

import hmac

from flask import Flask, jsonify, request

from serve import products
from serve.errors import ApiError

DEFAULT_TOKEN_ENV = "IMGSEARCH_ADMIN_TOKEN"


def check_admin(token: str | None, token_env: str) -> None:
    check_bearer(token, token_env, "admin")


def check_bearer(token: str | None, token_env: str, kind: str) -> None:
    """The request's ``Authorization: Bearer`` token equals ``token`` (``kind``: "admin" or
    "shard", named in the codes and messages), else an ApiError."""
    if not token:
        raise ApiError(403, f"{kind}_disabled", f"{kind} endpoints are disabled: ${token_env} is not set on the server")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        shown = f"got {scheme!r}" if header else "no Authorization header"
        raise ApiError(401, "missing_token", f"{kind} endpoints need 'Authorization: Bearer <token>'; {shown}")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(403, "wrong_token", f"the {kind} token is wrong")


def register_admin_routes(app: Flask, service, *, token: str | None, token_env: str = DEFAULT_TOKEN_ENV,
                          reload_hook=None) -> None:
    """``reload_hook(headers)``, when given, runs before the local reload (a shard front
    forwards the reload to its shard servers)."""

    def admin() -> None:
        check_admin(token, token_env)

    @app.post("/v1/products")
    def put_product():
        admin()
        body, status = products.put_product(service, request)
        return jsonify(body), status

    @app.delete("/v1/products/<path:product_id>")
    def delete_product(product_id: str):
        admin()
        return jsonify(products.delete_product(service, product_id))

    @app.post("/v1/admin/reload")
    def reload():
        admin()
        if request.content_length:
            raise ApiError(400, "unexpected_body", f"reload takes no body, got {request.content_length} bytes")
        previous = service.live()
        forwarded = reload_hook(request.headers.get("Authorization", "")) if reload_hook else None
        live = service.reload()
        body = {"index_version": live.version, "previous_version": previous.version if previous else None,
                "ntotal": live.ntotal}
        if forwarded is not None:
            body["shards"] = forwarded
        return jsonify(body)
