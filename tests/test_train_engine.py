"""Training end to end on a tiny real sample set: checkpoint contents, load_embedder, exact resume, CLI wiring."""

import numpy as np
import pytest
import torch

from embed.checkpoint import Checkpoint
from embed.pipeline import load_detector, load_embedder
from imgsearch import cli
from imgsearch.sample_data import build_sample_set
from train.commands import main

torch.set_num_threads(2)

# Small images and few views: the point is the wiring, not the accuracy.
TINY = ["--image-size", "64", "--detector-image-size", "128", "--views", "3", "--scenes", "6", "--detector-passes", "2",
        "--max-products", "4", "--progress", "off", "--no-baseline"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    sample = build_sample_set(tmp_path_factory.mktemp("sample"), seed=0, limit_products=8, queries_per_product=1, progress=False)
    return str(sample.catalog_csv)


@pytest.fixture(scope="module")
def two_epochs(catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model.ckpt"
    return out, main([catalog, "--output", str(out), "--epochs", "2", *TINY])


def test_smoke_train_writes_a_checkpoint_that_load_embedder_loads(two_epochs):
    path, summary = two_epochs
    embedder = load_embedder(path, device="cpu")
    vectors = embedder.embed([_photo()])
    assert vectors.shape == (1, 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.config.image_size == 64
    assert load_detector(path) is not None
    assert {"recall@1", "recall@10", "ap@0.5"} <= set(summary["evaluation"][0])
    # The catalog both as clean shots and as `imgsearch embed` ingests it (through the detector).
    assert [row["catalog"] for row in summary["evaluation"]] == ["whole", "detect"]


def test_checkpoint_holds_model_optimisers_epoch_config_metrics_and_hash(two_epochs):
    path, summary = two_epochs
    loaded = Checkpoint.load(path)  # verifies the weights hash
    extra = loaded.extra
    assert extra["epoch"] == 2 and len(extra["history"]) == 2
    assert extra["train_config"]["epochs"] == 2 and extra["train_config"]["loss"] == "triplet"
    assert extra["train_config"]["detector_passes"] == 2
    assert set(extra["optimizers"]) == {"embedder", "detector"} and extra["optimizers"]["embedder"]["state"]
    assert extra["metrics"]["epoch"] == 2 and "val_recall@1" in extra["metrics"]
    assert set(extra["run_info"]["train_products"]).isdisjoint(extra["run_info"]["eval_products"])
    assert load_embedder(path, device="cpu").model_hash == loaded.weights_sha256


def test_resume_continues_exactly(catalog, two_epochs, tmp_path):
    _, uninterrupted = two_epochs
    first = tmp_path / "first.ckpt"
    main([catalog, "--output", str(first), "--epochs", "1", "--no-eval", *TINY])
    resumed = main([catalog, "--output", str(tmp_path / "resumed.ckpt"), "--resume", str(first), "--epochs", "2", "--no-eval",
                    "--progress", "off"])
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for key in ("embed_loss", "detector_loss", "val_recall@1"):
        assert resumed["history"][1][key] == pytest.approx(uninterrupted["history"][1][key], abs=1e-6), key
    same = Checkpoint.load(tmp_path / "resumed.ckpt").state_dict
    for name, tensor in Checkpoint.load(two_epochs[0]).state_dict.items():
        torch.testing.assert_close(same[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("trainable_from", [11, 14, 17])
def test_detector_scene_cache_holds_the_map_where_learning_starts(catalog, trainable_from):
    """Below 14 the cache is the map block FROM reads; from 14 up the stride-16 map, plus the frozen blocks' output above it."""
    from dataclasses import replace

    from embed.detector import DetectorConfig, ProductDetector
    from train.commands import TrainingData
    from train.engine import DetectorStage, TrainConfig

    config = replace(TrainConfig(scenes=4, detector_passes=1, detector_image_size=128, max_products=4),
                     detector_trainable_from=trainable_from)
    detector = ProductDetector.pretrained(DetectorConfig(image_size=128))
    stage = DetectorStage(detector, config)
    cache = stage.cache(TrainingData.from_catalog(catalog, config).scenes(), progress=False, batch=2)
    channels = {11: 64, 14: 96, 17: 96}[trainable_from]  # block 10's output; the stride-16 map
    assert len(cache) == 4 and cache.inputs.shape[:2] == (4, channels)
    if trainable_from == 17:
        assert cache.frozen32.shape[:2] == (4, 160)  # the output of frozen blocks 14..16
    else:
        assert cache.frozen32 is None
    head = cache.first(3)
    assert len(head) == 3 and torch.equal(head.inputs, cache.inputs[:3]) and (head.frozen32 is None) == (cache.frozen32 is None)
    learning = {name for name, p in detector.model.backbone.named_parameters() if p.requires_grad}

    def block(i):  # trunk slices keep the trunk's own block numbers as module names
        return f"to_stride16.{i}." if i < 14 else f"to_stride32.{i}."

    assert any(name.startswith(block(trainable_from)) for name in learning)
    assert not any(name.startswith(block(trainable_from - 1)) for name in learning)
    before = {name: p.detach().clone() for name, p in detector.model.backbone.named_parameters()}
    assert np.isfinite(stage.train_epoch(cache, 0))
    changed = {name for name, p in detector.model.backbone.named_parameters() if not torch.equal(before[name], p)}
    assert changed and changed <= learning


def test_embedder_batches_shrink_to_the_products_and_views_the_cache_holds():
    from embed.model import EmbedderConfig, EmbeddingNet
    from train.engine import EmbedderStage, TrainConfig, ViewCache

    stage = EmbedderStage(EmbeddingNet.pretrained(EmbedderConfig(image_size=64)), TrainConfig(image_size=64))
    sampler = stage.sampler(ViewCache(torch.zeros(12, 1), np.repeat(np.arange(4), 3)))  # 4 products x 3 views
    assert (sampler.p, sampler.k) == (4, 3)
    assert (TrainConfig().products_per_batch, TrainConfig().views_per_batch) == (32, 6)


def test_cli_train_is_wired_and_reports_bad_catalog(tmp_path, capsys):
    status = cli.main(["train", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "x.ckpt")])
    assert status == 2
    assert "missing.csv" in capsys.readouterr().err


def _photo():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.coffee())
