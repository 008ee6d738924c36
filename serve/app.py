"""The Flask app: routes only. Query work lives in :mod:`serve.service`, admin writes in
:mod:`serve.admin`/:mod:`serve.products`, the shard endpoint in :mod:`serve.shards`."""

from __future__ import annotations

import mimetypes
import os
import time

from flask import Flask, Response, g, jsonify, request

from serve.accesslog import log_request
from serve.admin import DEFAULT_TOKEN_ENV, register_admin_routes
from serve.errors import ApiError, register_error_handlers
from serve.metrics import ServerMetrics, exposition
from serve.openapi import openapi_document
from serve.requests import buffer_body, parse_search_request
from serve.shards import register_shard_routes

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
_FROM_ENV = object()


def create_app(service, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics: ServerMetrics | None = None,
               admin_token=_FROM_ENV, admin_token_env: str = DEFAULT_TOKEN_ENV, reload_hook=None,
               shard_token=_FROM_ENV, shard_token_env: str | None = None) -> Flask:
    """``service`` is a :class:`serve.service.SearchService` (or anything with its methods).

    ``admin_token``: the admin Bearer token; by default read from ``$admin_token_env``
    (unset or empty: admin endpoints answer 403). ``shard_token_env``: given on a shard server
    only, it turns on ``POST /v1/shard/search``, which needs ``shard_token`` (by default read
    from ``$shard_token_env``); without it that route does not exist (404)."""
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False
    metrics = metrics or ServerMetrics()
    app.extensions["imgsearch"] = {"service": service, "metrics": metrics}
    service.attach_metrics(metrics)
    register_error_handlers(app)
    token = os.environ.get(admin_token_env) if admin_token is _FROM_ENV else admin_token

    @app.before_request
    def _start_timer_and_check_size() -> None:
        g.start = time.perf_counter()
        # Refuse an oversized body by its declared length, before any parsing or media-type check.
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise ApiError(413, "body_too_large", f"request body is {request.content_length} bytes, over the limit of {max_body_bytes}")
        buffer_body(request, max_body_bytes)

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        seconds = time.perf_counter() - g.get("start", time.perf_counter())
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        metrics.request_seconds.labels(endpoint).observe(seconds)
        live = service.live()
        log_request(request, response, endpoint, seconds, live.version if live is not None else None)
        return response

    @app.get("/")
    def page():
        return app.send_static_file("index.html")

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        live = service.live()
        if live is None:
            raise ApiError(503, "not_ready", service.not_ready_reason())
        return jsonify({"status": "ready", "index_version": live.version, "ntotal": live.ntotal, "dim": live.dim,
                        "metric": "ip" if live.higher_is_better else "l2"})

    @app.get("/metrics")
    def prometheus_metrics():
        body, content_type = exposition(metrics)
        return Response(body, headers={"Content-Type": content_type})  # as is: one charset

    @app.post("/v1/search")
    def search():
        start = time.perf_counter()
        service.arrivals.enter()  # tells the micro-batchers a query is on its way
        try:
            live = service.live()
            if live is None:
                raise ApiError(503, "not_ready", service.not_ready_reason())
            query = parse_search_request(request, live.dim)
            body = service.search(live, query)
        finally:
            service.arrivals.leave()
        return jsonify({"index_version": live.version, "took_ms": round((time.perf_counter() - start) * 1e3, 3), **body})

    @app.get("/v1/products/<path:product_id>/image")
    def product_image(product_id: str):
        data, name, digest = service.image_file(product_id, request.args.get("image"))
        response = Response(data, mimetype=mimetypes.guess_type(name)[0] or "application/octet-stream")
        response.set_etag(digest)
        response.cache_control.public, response.cache_control.max_age = True, 3600
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response.make_conditional(request)

    @app.get("/v1/products/<path:product_id>")
    def product(product_id: str):
        return jsonify(service.product(product_id))

    @app.get("/v1/model")
    def model():
        from serve.models import model_body

        return jsonify(model_body(service))

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document(app, admin_token_env=admin_token_env, shard_token_env=shard_token_env))

    @app.get("/docs")
    def docs():
        return app.send_static_file("docs.html")

    register_admin_routes(app, service, token=token, token_env=admin_token_env, reload_hook=reload_hook)
    if shard_token_env is not None:
        register_shard_routes(app, service, token=os.environ.get(shard_token_env) if shard_token is _FROM_ENV else shard_token,
                              token_env=shard_token_env)
    return app
