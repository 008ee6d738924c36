"""Fast runtimes agree with the eager forward (speed: bench/bench_embed.py); the ONNX export cache."""

import numpy as np
import pytest
import torch
from torch import nn

import embed.runtime as runtime
from embed.pipeline import load_embedder
from embed.runtime import onnxruntime_available
from imgsearch.errors import BadInput

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def eager_vectors(real_photos):
    return load_embedder(None, device="cpu", runtime="eager").embed(real_photos)


def test_torchscript_runtime_is_float32_exact(real_photos, eager_vectors):
    embedder = load_embedder(None, device="cpu", runtime="torchscript")
    assert embedder.runtime == "torchscript"
    np.testing.assert_allclose(embedder.embed(real_photos), eager_vectors, atol=1e-4)


def test_auto_picks_onnxruntime_when_installed_else_torchscript():
    expected = "onnxruntime" if onnxruntime_available() else "torchscript"
    assert load_embedder(None, device="cpu").runtime == expected


def test_missing_onnxruntime_falls_back_to_torchscript(monkeypatch):
    import embed.runtime

    def broken(*args, **kwargs):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(embed.runtime, "OnnxRuntimeRunner", broken)
    assert load_embedder(None, device="cpu", runtime="onnxruntime").runtime == "torchscript"


@pytest.mark.onnxruntime
def test_onnxruntime_matches_eager(real_photos, eager_vectors):
    embedder = load_embedder(None, device="cpu", runtime="onnxruntime")
    assert embedder.runtime == "onnxruntime"
    np.testing.assert_allclose(embedder.embed(real_photos), eager_vectors, atol=1e-4)


def test_int8_stays_close_to_fp32(real_photos, eager_vectors):
    embedder = load_embedder(None, device="cpu", runtime="int8", calibration=real_photos)
    cosine = (embedder.embed(real_photos) * eager_vectors).sum(axis=1)
    assert embedder.runtime == "int8" and (cosine > 0.9).all(), cosine


def test_int8_without_calibration_and_unknown_runtimes_are_errors():
    with pytest.raises(BadInput, match="calibration"):
        load_embedder(None, runtime="int8")
    with pytest.raises(BadInput, match="'tensorrt'"):
        load_embedder(None, runtime="tensorrt")


# --- the ONNX export cache (embed.runtime.OnnxModel), shared by the embedder and the detector ---

def tiny_net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def tiny_model(net: nn.Module) -> runtime.OnnxModel:
    return runtime.OnnxModel("tiny", net, torch.zeros(2, 3, 16, 16), ["out"], {"size": 16}, threads=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.ONNX_CACHE_ENV, str(tmp_path / "onnx"))
    return tmp_path / "onnx"


@pytest.mark.onnxruntime
def test_export_is_cached_atomically_and_reused_without_exporting(cache, forbid_onnx_export):
    net = tiny_net()
    first = tiny_model(net)
    assert first.source == "export" and first.path.parent == cache and first.path.is_file()
    assert [p.name for p in cache.iterdir()] == [first.path.name]  # no temp file left behind
    mtime = first.path.stat().st_mtime_ns
    forbid_onnx_export()
    second = tiny_model(net)
    assert second.source == "cache" and second.path == first.path and first.path.stat().st_mtime_ns == mtime
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(second(x)[0], want, atol=1e-5)


@pytest.mark.onnxruntime
@pytest.mark.parametrize("damage", ["garbage", "truncated", "other weights"])
def test_a_damaged_or_stale_cache_file_is_detected_and_replaced(cache, damage, caplog):
    net = tiny_net()
    path = tiny_model(net).path
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"definitely not an ONNX protobuf" * 10)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:  # a valid graph of another model under this model's name
        path.write_bytes(tiny_model(tiny_net(seed=1)).path.read_bytes())
    with caplog.at_level("WARNING", logger="embed.runtime"):
        again = tiny_model(net)
    assert again.source == "export" and "unusable" in caplog.text
    assert path.read_bytes() != b"" and tiny_model(net).source == "cache"  # the replacement is valid


@pytest.mark.onnxruntime
def test_cache_off_or_unwritable_still_gives_a_working_session(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(runtime.ONNX_CACHE_ENV, "off")
    model = tiny_model(tiny_net())
    assert model.path is None and model.source == "export"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(runtime.ONNX_CACHE_ENV, str(blocker / "onnx"))  # its parent is a file: mkdir fails
    with caplog.at_level("WARNING", logger="embed.runtime"):
        model = tiny_model(tiny_net())
    assert model.source == "export" and "cannot cache" in caplog.text
    assert model(np.zeros((1, 3, 16, 16), np.float32))[0].shape == (1, 4)


def test_cache_key_follows_weights_config_and_shape():
    net = tiny_net()
    key = runtime.onnx_cache_key("tiny", net, (2, 3, 16, 16), {"size": 16})
    assert key == runtime.onnx_cache_key("tiny", tiny_net(), (5, 3, 16, 16), {"size": 16})  # batch size is dynamic
    assert key != runtime.onnx_cache_key("tiny", tiny_net(seed=1), (2, 3, 16, 16), {"size": 16})
    assert key != runtime.onnx_cache_key("tiny", net, (2, 3, 32, 32), {"size": 16})
    assert key != runtime.onnx_cache_key("tiny", net, (2, 3, 16, 16), {"size": 17})
    assert key != runtime.onnx_cache_key("other", net, (2, 3, 16, 16), {"size": 16})


@pytest.mark.onnxruntime
def test_embedder_second_load_reads_the_cache(cache, forbid_onnx_export, real_photos, eager_vectors):
    first = load_embedder(None, device="cpu", runtime="onnxruntime")
    assert first.runner.model.source == "export"
    forbid_onnx_export()
    second = load_embedder(None, device="cpu", runtime="onnxruntime")
    assert second.runtime == "onnxruntime" and second.runner.model.source == "cache"
    np.testing.assert_allclose(second.embed(real_photos), eager_vectors, atol=1e-4)


def test_preprocessor_normalises_in_numpy_bit_exact_with_torch_ops_into_channels_last(real_photos):
    from embed.preprocess import Preprocessor

    preprocess = Preprocessor(224)
    got = preprocess(real_photos)
    x = torch.from_numpy(preprocess.to_uint8(real_photos)).permute(0, 3, 1, 2).float().div_(255.0)
    want = x.sub_(torch.tensor(preprocess.mean).view(1, 3, 1, 1)).div_(torch.tensor(preprocess.std).view(1, 3, 1, 1))
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
