"""Shared test setup: the ``onnxruntime`` marker, four real photos, and a guard against re-exporting ONNX graphs."""

import pytest
from PIL import Image
from skimage import data


def pytest_configure(config):
    config.addinivalue_line("markers", "onnxruntime: needs the onnxruntime and onnx packages; skipped without them")


def pytest_runtest_setup(item):
    if item.get_closest_marker("onnxruntime") is not None:
        from embed.runtime import onnxruntime_available

        if not onnxruntime_available():
            pytest.skip("onnxruntime/onnx not installed")


@pytest.fixture(scope="module")
def real_photos() -> list[Image.Image]:
    """scikit-image's astronaut, coffee, chelsea and rocket: real RGB photos of 300-640 px."""
    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]


@pytest.fixture
def forbid_onnx_export(monkeypatch):
    """``forbid_onnx_export()``: from then on, any ONNX export fails the test (the on-disk cache must serve)."""
    import embed.runtime

    def forbid() -> None:
        def no_export(*args, **kwargs):
            raise AssertionError("exported although the cache holds a valid export of this model")

        monkeypatch.setattr(embed.runtime, "_export_onnx", no_export)

    return forbid
