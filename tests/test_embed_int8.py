"""The int8 embedder (ONNX Runtime static QDQ quantization of the trunk) stays close to fp32 on real product photos.

Calibration: catalog shots of some sample-set products; gallery: catalog shots
of others; queries: those products pasted into real background photos and
cropped, as a shopper's photo would be. Accuracy numbers: bench/bench_embed.py.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import embed.runtime as runtime
from embed.pipeline import crop_with_margin, load_embedder
from embed.quantize import CALIBRATION_CHUNK, QuantSettings, calibration_digest, calibration_ranges
from embed.runtime import OnnxModel
from imgsearch.errors import BadInput
from imgsearch.sample_data.products import catalog_shot, list_products, load_cutout
from imgsearch.sample_data.scenes import list_backgrounds, render_scene

torch.set_num_threads(2)
pytestmark = pytest.mark.onnxruntime

N_CALIBRATION, N_GALLERY = 16, 16
# Measured here: mean cosine int8 vs fp32 0.970 over gallery and queries, 10th percentile ~0.966, and one
# nearly blank catalog shot at 0.73 (min); top-1 agreement 14-15 of 16. The old torch-FX int8 runner lost 0.21 R@1.
MIN_MEAN_COSINE, MIN_P10_COSINE, MIN_COSINE, MIN_TOP1_AGREEMENT = 0.95, 0.93, 0.6, 0.75


@pytest.fixture(scope="module")
def photos():
    products = list_products()[:: max(1, len(list_products()) // (N_CALIBRATION + N_GALLERY))]
    calibration = [catalog_shot(p) for p in products[:N_CALIBRATION]]
    shown = products[N_CALIBRATION : N_CALIBRATION + N_GALLERY]
    gallery = [catalog_shot(p) for p in shown]
    backgrounds = list_backgrounds()
    queries = []
    for k, product in enumerate(shown):
        render = render_scene([load_cutout(product, max_side=256)], np.random.default_rng([7, k]), backgrounds)
        queries.append(crop_with_margin(render.image, render.boxes[0], 0.10))
    return calibration, gallery, queries


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("int8") / "onnx"
        patch.setenv(runtime.ONNX_CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def embedders(cache_dir, photos):
    calibration = photos[0]
    return (load_embedder(None, device="cpu", runtime="onnxruntime"),
            load_embedder(None, device="cpu", runtime="int8", calibration=calibration))


def test_int8_vectors_stay_close_to_fp32_and_agree_on_top1(embedders, photos):
    fp32, int8 = embedders
    assert int8.runtime == "int8" and int8.runner.source == "quantize"
    _, gallery, queries = photos
    g32, q32 = fp32.embed(gallery), fp32.embed(queries)
    g8, q8 = int8.embed(gallery), int8.embed(queries)
    cosine = np.concatenate([(g8 * g32).sum(1), (q8 * q32).sum(1)])
    assert cosine.mean() >= MIN_MEAN_COSINE and np.quantile(cosine, 0.1) >= MIN_P10_COSINE, cosine
    assert cosine.min() >= MIN_COSINE, cosine
    top32 = (q32 @ g32.T).argmax(1)
    for name, top in (("int8", (q8 @ g8.T).argmax(1)), ("int8 query, fp32 gallery", (q8 @ g32.T).argmax(1))):
        agreement = float(np.mean(top == top32))
        print(name, "top-1 agreement", agreement, "mean cosine", cosine.mean())
        assert agreement >= MIN_TOP1_AGREEMENT, (name, agreement)


def test_second_load_reads_the_int8_cache_without_quantizing(embedders, photos, monkeypatch, cache_dir):
    _, first = embedders
    assert first.runner.path.parent == cache_dir and first.runner.path.is_file()

    def no_quantize(*args, **kwargs):
        raise AssertionError("quantized again although the cache holds a valid int8 graph")

    monkeypatch.setattr(runtime, "quantize_graph", no_quantize)
    second = load_embedder(None, device="cpu", runtime="int8", calibration=photos[0])
    assert second.runtime == "int8" and second.runner.source == "cache"
    np.testing.assert_allclose(second.embed(photos[1][:4]), first.embed(photos[1][:4]), atol=1e-5)


def test_a_damaged_int8_cache_file_is_replaced(embedders, photos, caplog):
    path = embedders[1].runner.path
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    with caplog.at_level("WARNING", logger="embed.runtime"):
        again = load_embedder(None, device="cpu", runtime="int8", calibration=photos[0])
    assert again.runtime == "int8" and again.runner.source == "quantize" and "unusable" in caplog.text
    assert path.stat().st_size == len(good)


def test_chunked_calibration_ranges_match_one_call_over_all_images(embedders, photos):
    """Chunked histograms keep the first chunk's bin width, so a percentile cut may move by up to ~2 one-call bins.

    Measured (bench/bench_int8_calibration.py, 64 images): chunks of 8/16/32 vs one call, at most 1.26/1.95/1.95
    bins of 2 * max|x| / 2048, half the tensors identical; here (32 images, chunks of 8) 1.16.
    """
    fp32 = embedders[0]
    images = fp32.preprocess(photos[0] + photos[1]).numpy()  # 32 real product photos
    net = fp32.net
    graph = OnnxModel("embedder", net, torch.zeros(2, *images.shape[1:]), ["vectors"], net.config.to_dict()).graph
    single = calibration_ranges(graph, images, chunk=len(images))
    chunked = calibration_ranges(graph, images, chunk=8)  # 4 collect_data calls
    ragged = calibration_ranges(graph, images[:27], chunk=8)  # a short last chunk is used, not dropped or fatal
    assert set(chunked) == set(single) and set(ragged) == set(single) and len(single) > 50
    deviations = []
    for name, (lo, hi) in single.items():
        bin_width = 2 * max(abs(lo), abs(hi)) / 2048
        deviations.append(max(abs(chunked[name][0] - lo), abs(chunked[name][1] - hi)) / max(bin_width, 1e-12))
    print("max deviation in one-call bins", max(deviations), "median", np.median(deviations))
    assert max(deviations) <= 2.5, max(deviations)
    minmax = calibration_ranges(graph, images, QuantSettings(method="minmax"), chunk=len(images))
    minmax_chunked = calibration_ranges(graph, images, QuantSettings(method="minmax"), chunk=5)
    for name, (lo, hi) in minmax.items():  # min/max merge exactly
        assert minmax_chunked[name] == pytest.approx((lo, hi), rel=1e-6, abs=1e-7)


QUANTIZE_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    import embed.quantize as quantize

    def peak_kb():  # VmHWM, not ru_maxrss: that one keeps the forking pytest process's peak across exec
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

    quantize.CALIBRATION_CHUNK = 4
    graph, images = open(sys.argv[1], "rb").read(), np.load(sys.argv[2])
    before = peak_kb()
    data = quantize.quantize_graph(graph, images)
    assert len(data) > 1000
    print("GROWTH_MB", (peak_kb() - before) / 1024)
""")


def test_quantizing_holds_one_chunk_of_activations_not_the_whole_calibration_set(embedders, photos, tmp_path):
    """Measured: ~60 MB of activations per 224 px image per collect_data call; one call over these 48 images
    grows peak RSS by ~3.1 GB, chunks of 4 by ~0.36 GB."""
    fp32 = embedders[0]
    images = fp32.preprocess((photos[0] + photos[1]) * 2)[:48].numpy()
    net = fp32.net
    graph = OnnxModel("embedder", net, torch.zeros(2, *images.shape[1:]), ["vectors"], net.config.to_dict()).graph
    (tmp_path / "fp32.onnx").write_bytes(graph)
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run([sys.executable, "-c", QUANTIZE_IN_A_FRESH_PROCESS, str(tmp_path / "fp32.onnx"),
                           str(tmp_path / "images.npy")], capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = float(proc.stdout.split("GROWTH_MB")[-1])
    print("quantize_graph RSS growth, MB:", growth)
    assert growth < 1200, growth


def test_calibration_chunk_is_part_of_the_cache_key():
    assert QuantSettings().to_dict()["chunk"] == CALIBRATION_CHUNK


def test_int8_cache_key_follows_calibration_set_and_settings(photos, embedders):
    images = embedders[0].preprocess(photos[0]).numpy()
    digest = calibration_digest(images)
    assert digest == calibration_digest(np.ascontiguousarray(images))  # memory layout is not identity
    assert digest != calibration_digest(images[:-1])
    assert digest != calibration_digest(embedders[0].preprocess(photos[0][::-1]).numpy())  # same images, other order
    base = runtime.int8_cache_key("fp32", digest, QuantSettings(), "1.0")
    assert base == runtime.int8_cache_key("fp32", digest, QuantSettings(), "1.0")
    others = [runtime.int8_cache_key("fp32", calibration_digest(images[1:]), QuantSettings(), "1.0"),
              runtime.int8_cache_key("other-fp32", digest, QuantSettings(), "1.0"),
              runtime.int8_cache_key("fp32", digest, QuantSettings(), "1.1"),
              *(runtime.int8_cache_key("fp32", digest, s, "1.0") for s in (
                  QuantSettings(per_channel=False), QuantSettings(reduce_range=not QuantSettings().reduce_range), QuantSettings(method="entropy"),
                  QuantSettings(method="percentile", percentile=99.9), QuantSettings(float_last_blocks=1),
                  QuantSettings(float_first_conv=True), QuantSettings(float_depthwise=True),
                  QuantSettings(activations="int8"), QuantSettings(symmetric_activations=True)))]
    assert base not in others and len(set(others)) == len(others)


def test_bad_settings_and_missing_calibration_are_clear_errors():
    with pytest.raises(BadInput, match="'kl'"):
        QuantSettings(method="kl")
    with pytest.raises(BadInput, match="'fp8'"):
        QuantSettings(activations="fp8")
    with pytest.raises(BadInput, match="calibration"):
        load_embedder(None, device="cpu", runtime="int8", calibration=[])
    with pytest.raises(BadInput, match="chunk"):
        calibration_ranges(b"", np.zeros((1, 3, 8, 8), np.float32), chunk=0)


@pytest.mark.parametrize("flags, lacks", [("fpu avx2 fma", True), ("fpu avx2 avx512f avx512_vnni", False),
                                          ("fpu avx2 avx_vnni", False), ("fp asimd", False)])
def test_reduce_range_is_resolved_from_the_cpus_vnni_support(tmp_path, flags, lacks):
    from embed.quantize import cpu_lacks_vnni

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_lacks_vnni(str(info)) is lacks
    assert cpu_lacks_vnni(str(tmp_path / "missing")) is False
    assert QuantSettings().reduce_range is cpu_lacks_vnni()
    assert QuantSettings(reduce_range=False).reduce_range is False
