"""Embedder: shapes, norms, determinism, robustness on real photos, weights handling."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from embed.model import BadCheckpoint, EmbedderConfig, EmbeddingNet, GeM
from embed.pipeline import load_embedder
from imgsearch.errors import BadInput, MissingAsset

torch.set_num_threads(2)

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTO_NAMES}


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(None, device="cpu")


def test_embeddings_are_n_by_128_float32_unit_vectors(embedder, photos):
    vectors = embedder.embed(list(photos.values()))
    assert vectors.shape == (len(photos), 128) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_empty_matrix(embedder):
    assert embedder.embed([]).shape == (0, 128)


def test_same_input_same_output_across_two_loads_and_batch_sizes(embedder, photos):
    images = list(photos.values())
    first = embedder.embed(images, batch_size=4)
    again = load_embedder(None, device="cpu")
    np.testing.assert_allclose(again.embed(images, batch_size=1), first, atol=1e-5)
    assert again.model_hash == embedder.model_hash and len(embedder.model_hash) == 64


def test_bytes_paths_and_pil_images_embed_alike(embedder, photos, tmp_path):
    image = photos["coffee"]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = tmp_path / "coffee.png"
    path.write_bytes(buffer.getvalue())
    vectors = embedder.embed([image, buffer.getvalue(), path, str(path)])
    np.testing.assert_allclose(vectors, np.repeat(vectors[:1], 4, axis=0), atol=1e-5)


def test_rotated_and_cropped_copies_embed_closer_to_their_source_than_other_photos(embedder, photos):
    names = list(photos)
    sources = embedder.embed([photos[n] for n in names])
    for i, name in enumerate(names):
        image = photos[name]
        w, h = image.size
        variants = [
            image.rotate(12, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(255, 255, 255)),
            image.crop((int(0.08 * w), int(0.1 * h), int(0.9 * w), int(0.95 * h))),
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((w // 2, h // 2)),
        ]
        similarity = embedder.embed(variants) @ sources.T
        assert (similarity.argmax(axis=1) == i).all(), f"{name}: {similarity.round(3)}"


def test_missing_weights_file_is_missing_asset_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "mobilenet_v2-b0353104.pth"
    with pytest.raises(MissingAsset, match=str(missing)):
        load_embedder(None, weights=missing)


def test_weights_file_of_the_wrong_kind_is_a_clear_error(tmp_path):
    wrong = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(BadCheckpoint, match="does not hold mobilenet_v2 weights"):
        load_embedder(None, weights=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(BadCheckpoint, match="garbage.pth"):
        load_embedder(None, weights=garbage)


def test_resnet50_needs_an_explicit_weights_file():
    with pytest.raises(MissingAsset, match="resnet50"):
        EmbeddingNet.pretrained(EmbedderConfig(backbone="resnet50"))


def test_resnet50_option_builds_a_2048_channel_head():
    net = EmbeddingNet.skeleton(EmbedderConfig(backbone="resnet50", image_size=64)).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 3, 64, 64))
    assert net.head.projection.in_features == 2048 and out.shape == (2, 128)


def test_config_rejects_bad_values_quoting_them():
    with pytest.raises(BadInput, match="'vgg'"):
        EmbedderConfig(backbone="vgg")
    with pytest.raises(BadInput, match="0.5"):
        EmbedderConfig(gem_p=0.5)
    with pytest.raises(BadInput, match="colour"):
        EmbedderConfig.from_dict({"colour": "red"})


def test_gem_with_p_1_is_average_pooling_and_grows_toward_max():
    x = torch.rand(2, 5, 4, 4)
    torch.testing.assert_close(GeM(1.0)(x), x.mean(dim=(-2, -1)))
    high = GeM(50.0)(x)
    assert (high <= x.amax(dim=(-2, -1)) + 1e-5).all() and (high > x.mean(dim=(-2, -1))).all()


def test_untrained_projection_is_orthonormal_and_seeded():
    a, b = EmbeddingNet.skeleton(EmbedderConfig()), EmbeddingNet.skeleton(EmbedderConfig())
    a.head.fix_projection(0)
    b.head.fix_projection(0)
    weight = a.head.projection.weight
    torch.testing.assert_close(weight, b.head.projection.weight)
    torch.testing.assert_close(weight @ weight.T, torch.eye(128), atol=1e-5, rtol=0)
