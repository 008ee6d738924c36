"""/metrics of a real ``imgsearch serve --workers 2``: one sum over both worker processes."""

import re
import urllib.request

import pytest

from tests.test_hostile_http import VECTOR, _start, env, post_json  # noqa: F401 - env is a fixture

SEARCHES = 24


def scrape(server) -> tuple[str, str]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        return response.read().decode(), response.headers["Content-Type"]


def sample(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.fixture(scope="module")
def two_workers(env):  # noqa: F811 - the imported fixture
    server = _start(env, "metrics", "--workers", "2")
    try:
        yield server
    finally:
        server.kill()


def test_counters_are_summed_over_the_workers_and_never_go_back(two_workers):
    for _ in range(SEARCHES):  # a new connection each: both workers take some
        assert post_json(two_workers, "/v1/search", VECTOR)[0] == 200
    seen = []
    for _ in range(6):
        text, _ = scrape(two_workers)
        assert sample(text, "imgsearch_workers") == 2, text[-2000:]
        assert sample(text, "imgsearch_requests_total", endpoint="/v1/search", method="POST", code="200") == SEARCHES
        seen.append(sample(text, "imgsearch_requests_total", endpoint="/metrics"))
    assert seen == sorted(seen) and seen[-1] > seen[0]  # the scrapes themselves count up, in any worker
    assert sample(text, "process_resident_memory_bytes") > 50e6  # two workers' memory, summed
    assert 'imgsearch_build_info{' in text and 'imgsearch_index_info{version="v1"} 1.0' in text


def test_metrics_content_type_names_one_charset(two_workers):
    _, content_type = scrape(two_workers)
    assert content_type.lower().count("charset") == 1, content_type
    assert content_type.startswith("text/plain; version=")
