"""Checkpoints: round trip, hash and format checks, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from embed.checkpoint import Checkpoint, state_dict_sha256
from embed.detector import DetectorConfig, ProductDetector
from embed.model import BadCheckpoint, EmbedderConfig, EmbeddingNet
from embed.pipeline import load_detector, load_embedder, make_checkpoint
from imgsearch.errors import MissingAsset

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def trained_like_net() -> EmbeddingNet:
    """A net whose head differs from the untrained default, as after training."""
    net = EmbeddingNet.pretrained(EmbedderConfig(projection_bn=True))
    with torch.no_grad():
        net.head.pool.p.fill_(4.0)
        net.head.bn.running_mean.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(1))
    return net.eval()


@pytest.fixture(scope="module")
def saved(trained_like_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    make_checkpoint(trained_like_net, extra={"epoch": 3}).save(path)
    return path


def test_round_trip_gives_the_same_embeddings_config_and_hash(trained_like_net, saved):
    images = [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    loaded = load_embedder(saved, device="cpu", runtime="eager")
    with torch.inference_mode():
        expected = trained_like_net(loaded.preprocess(images)).numpy()
    np.testing.assert_allclose(loaded.embed(images), expected, atol=1e-5)
    assert loaded.config == trained_like_net.config
    assert loaded.model_hash == Checkpoint.load(saved).weights_sha256
    assert Checkpoint.load(saved).extra == {"epoch": 3}


def test_untrained_model_hash_matches_its_saved_checkpoint(tmp_path):
    net = EmbeddingNet.pretrained()
    path = make_checkpoint(net).save(tmp_path / "untrained.pt")
    assert load_embedder(path, runtime="eager").model_hash == load_embedder(None, runtime="eager").model_hash


def test_edited_weights_fail_the_hash_check(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    payload["state_dict"]["embedder.head.projection.weight"][0, 0] += 1.0
    tampered = tmp_path / "tampered.pt"
    torch.save(payload, tampered)
    with pytest.raises(BadCheckpoint, match="fails its weights hash check.*recorded sha256"):
        load_embedder(tampered)


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(saved.read_bytes()[: 4096])
    with pytest.raises(BadCheckpoint, match="broken.pt cannot be read as a checkpoint"):
        load_embedder(broken)


def test_other_torch_files_and_missing_files_are_rejected(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(BadCheckpoint, match="not an imgsearch checkpoint"):
        load_embedder(other)
    with pytest.raises(MissingAsset, match="absent.pt"):
        load_embedder(tmp_path / "absent.pt")


def test_weights_that_do_not_fit_the_config_are_rejected(trained_like_net, tmp_path):
    checkpoint = make_checkpoint(trained_like_net)
    checkpoint.config["embedder"]["dim"] = 64
    path = checkpoint.save(tmp_path / "misfit.pt")
    with pytest.raises(BadCheckpoint, match="do not fit its config"):
        load_embedder(path)


def test_hash_covers_names_and_shapes_not_only_bytes():
    a = {"w": torch.zeros(2, 3)}
    assert state_dict_sha256(a) != state_dict_sha256({"v": torch.zeros(2, 3)})
    assert state_dict_sha256(a) != state_dict_sha256({"w": torch.zeros(3, 2)})
    assert state_dict_sha256(a) == state_dict_sha256({"w": torch.zeros(2, 3)})


def test_a_detector_travels_in_the_same_checkpoint(trained_like_net, tmp_path):
    detector = ProductDetector.pretrained(DetectorConfig(score_threshold=0.4))
    path = make_checkpoint(trained_like_net, detector).save(tmp_path / "both.pt")
    loaded = load_detector(path)
    assert loaded.config == detector.config
    for name, tensor in detector.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert load_detector(make_checkpoint(trained_like_net)) is None
