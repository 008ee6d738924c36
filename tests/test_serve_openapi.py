"""``GET /openapi.json`` and ``GET /docs``: a valid OpenAPI 3.1 document of exactly the app's routes,
whose limits are the validation's own, and which agrees with what the server accepts."""

import re

import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec

from index.ann.limits import MAX_K
from serve.app import DEFAULT_MAX_BODY_BYTES, create_app
from serve.errors import ApiError
from serve.products import MAX_METADATA_BYTES, MAX_PRODUCT_ID, PRODUCT_FIELDS, parse_product_id
from serve.requests import DEFAULT_K, MAX_CATEGORY_LENGTH, SEARCH_FIELDS_FORM, SEARCH_FIELDS_JSON
from serve.service import SearchService
from serve.shards import MAX_SHARD_CANDIDATES, MAX_SHARD_ROWS, SHARD_SEARCH_FIELDS
from tests.test_serve import catalog_env, service, stored_vector  # noqa: F401 - module fixtures: a real store and index

BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def app(service):  # noqa: F811
    return create_app(service, max_body_bytes=BODY_LIMIT, admin_token="t0ken", admin_token_env="MY_ADMIN_TOKEN")


@pytest.fixture(scope="module")
def doc(app):
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return response.get_json()


def schema_of(doc, name: str):
    """A components schema as a standalone JSON Schema whose ``#/components/...`` refs resolve."""
    return jsonschema.Draft202012Validator({**doc["components"]["schemas"][name], "components": doc["components"]})


def routes(app) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        out |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def operations(doc) -> set[tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items() for method in item}


def test_the_document_is_valid_openapi_3_1(doc):
    assert doc["openapi"].startswith("3.1")
    validate_spec(doc)


def test_the_document_lists_exactly_the_routes_the_app_registers(app, doc):
    assert operations(doc) == routes(app)
    assert {("/v1/search", "post"), ("/openapi.json", "get"), ("/docs", "get"),
            ("/v1/products/{product_id}/image", "get")} <= operations(doc)
    assert "/v1/shard/search" not in doc["paths"]  # not a shard server: the route does not exist


def test_a_shard_servers_document_has_the_shard_route_and_its_limits(service):  # noqa: F811
    shard_app = create_app(service, shard_token="s3cret", shard_token_env="MY_SHARD_TOKEN")
    doc = shard_app.test_client().get("/openapi.json").get_json()
    validate_spec(doc)
    assert operations(doc) == routes(shard_app)
    op = doc["paths"]["/v1/shard/search"]["post"]
    assert op["security"] == [{"shardBearer": []}]
    assert "MY_SHARD_TOKEN" in doc["components"]["securitySchemes"]["shardBearer"]["description"]
    body = doc["components"]["schemas"]["ShardSearch"]
    assert body["properties"]["vectors"]["maxItems"] == MAX_SHARD_ROWS
    assert set(body["properties"]) == SHARD_SEARCH_FIELDS
    assert doc["info"]["x-limits"]["max_shard_candidates"] == MAX_SHARD_CANDIDATES
    assert str(MAX_SHARD_ROWS) in op["responses"]["413"]["description"]


def test_limits_are_the_validations_own(app, service, doc):  # noqa: F811
    schemas, lim = doc["components"]["schemas"], doc["info"]["x-limits"]
    k = schemas["SearchJson"]["properties"]["k"]
    assert (k["minimum"], k["maximum"], k["default"]) == (1, MAX_K, DEFAULT_K)
    assert schemas["SearchMultipart"]["properties"]["k"]["maximum"] == MAX_K
    assert lim["max_body_bytes"] == BODY_LIMIT == app.config["MAX_CONTENT_LENGTH"]
    assert f"{BODY_LIMIT:,}" in doc["paths"]["/v1/search"]["post"]["requestBody"]["description"]
    vector = schemas["SearchJson"]["properties"]["vector"]
    assert vector["minItems"] == vector["maxItems"] == service.live().dim == lim["dim"]
    assert schemas["SearchJson"]["properties"]["category"]["maxLength"] == MAX_CATEGORY_LENGTH
    assert set(schemas["SearchJson"]["properties"]) == SEARCH_FIELDS_JSON
    assert set(schemas["SearchMultipart"]["properties"]) == SEARCH_FIELDS_FORM | {"image"}
    assert set(schemas["ProductPut"]["properties"]) == PRODUCT_FIELDS
    assert schemas["ProductPut"]["properties"]["product_id"]["maxLength"] == MAX_PRODUCT_ID
    assert str(f"{MAX_METADATA_BYTES:,}") in schemas["ProductPut"]["properties"]["metadata"]["description"]
    assert lim["max_image_pixels"] == service.decode_budget.max_pixels
    default_doc = create_app(service).test_client().get("/openapi.json").get_json()
    assert default_doc["info"]["x-limits"]["max_body_bytes"] == DEFAULT_MAX_BODY_BYTES


@pytest.mark.parametrize("text", ["sku-1", "a/b é", "bell\x07", "tab\t", "del\x7f", "c1\x85", "nbsp\xa0", "line\n"])
def test_the_product_id_pattern_refuses_what_the_validation_refuses(doc, text):
    pattern = doc["components"]["schemas"]["ProductPut"]["properties"]["product_id"]["pattern"]
    try:
        parse_product_id(text)
        accepted = True
    except ApiError:
        accepted = False
    assert (re.search(pattern, text) is not None) == accepted
    assert schema_of(doc, "ProductPut").is_valid({"product_id": text, "image_base64": "AAAA"}) == accepted


def test_the_schemas_agree_with_what_the_server_accepts(app, doc, stored_vector):  # noqa: F811
    client, request = app.test_client(), schema_of(doc, "SearchJson")
    vector = stored_vector("prod-01")
    good = {"vector": vector, "k": MAX_K}
    assert request.is_valid(good)
    answer = client.post("/v1/search", json=good)
    assert answer.status_code == 200
    schema_of(doc, "SearchResponse").validate(answer.get_json())
    for bad in ({"vector": vector, "k": MAX_K + 1}, {"vector": vector + [0.0]}, {"vector": vector, "colour": "red"},
                {"vector": vector, "image_base64": "AAAA"}, {"k": 3}):
        assert not request.is_valid(bad), bad
        refused = client.post("/v1/search", json=bad)
        assert refused.status_code == 400, bad
        schema_of(doc, "Error").validate(refused.get_json())


def test_every_operation_documents_its_errors_with_the_error_schema(doc):
    error = {"$ref": "#/components/schemas/Error"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["responses"]["default"]["content"]["application/json"]["schema"] == error, (path, method)
            for status, answer in op["responses"].items():
                if status[0] in "45":
                    assert answer["content"]["application/json"]["schema"] == error, (path, method, status)
    search = doc["paths"]["/v1/search"]["post"]
    assert set(search["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"400", "413", "415", "422", "503"} <= set(search["responses"])


def test_admin_routes_require_the_admin_bearer(doc):
    scheme = doc["components"]["securitySchemes"]["adminBearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "MY_ADMIN_TOKEN" in scheme["description"]
    admin = {("/v1/products", "post"), ("/v1/products/{product_id}", "delete"), ("/v1/admin/reload", "post")}
    for path, method in operations(doc):
        secured = doc["paths"][path][method].get("security")
        assert (secured == [{"adminBearer": []}]) == ((path, method) in admin), (path, method)


def test_a_server_with_no_index_yet_still_serves_a_valid_document(catalog_env, tmp_path):  # noqa: F811
    _, store_path, _ = catalog_env
    empty = tmp_path / "no-index"
    empty.mkdir()
    idle = SearchService(empty, store_path)
    doc = create_app(idle).test_client().get("/openapi.json").get_json()
    validate_spec(doc)
    vector = doc["components"]["schemas"]["SearchJson"]["properties"]["vector"]
    assert doc["info"]["x-limits"]["dim"] is None and "minItems" not in vector


def test_docs_page_is_self_contained_and_reads_the_document(app):
    response = app.test_client().get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert 'fetch("/openapi.json")' in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "no CDN or other outside resource"
    assert "<script src" not in html and "@import" not in html
