"""Fast runtimes agree with the eager forward (speed itself is measured by bench/bench_embed.py)."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from embed.pipeline import load_embedder
from embed.runtime import onnxruntime_available
from imgsearch.errors import BadInput

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def eager_vectors(photos):
    return load_embedder(None, device="cpu", runtime="eager").embed(photos)


def test_torchscript_runtime_is_float32_exact(photos, eager_vectors):
    embedder = load_embedder(None, device="cpu", runtime="torchscript")
    assert embedder.runtime == "torchscript"
    np.testing.assert_allclose(embedder.embed(photos), eager_vectors, atol=1e-4)


def test_auto_picks_onnxruntime_when_installed_else_torchscript():
    expected = "onnxruntime" if onnxruntime_available() else "torchscript"
    assert load_embedder(None, device="cpu").runtime == expected


def test_missing_onnxruntime_falls_back_to_torchscript(monkeypatch):
    import embed.runtime

    def broken(*args, **kwargs):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(embed.runtime, "OnnxRuntimeRunner", broken)
    assert load_embedder(None, device="cpu", runtime="onnxruntime").runtime == "torchscript"


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime/onnx not installed")
def test_onnxruntime_matches_eager(photos, eager_vectors):
    embedder = load_embedder(None, device="cpu", runtime="onnxruntime")
    assert embedder.runtime == "onnxruntime"
    np.testing.assert_allclose(embedder.embed(photos), eager_vectors, atol=1e-4)


def test_int8_stays_close_to_fp32(photos, eager_vectors):
    embedder = load_embedder(None, device="cpu", runtime="int8", calibration=photos)
    cosine = (embedder.embed(photos) * eager_vectors).sum(axis=1)
    assert embedder.runtime == "int8" and (cosine > 0.9).all(), cosine


def test_int8_without_calibration_and_unknown_runtimes_are_errors():
    with pytest.raises(BadInput, match="calibration"):
        load_embedder(None, runtime="int8")
    with pytest.raises(BadInput, match="'tensorrt'"):
        load_embedder(None, runtime="tensorrt")
