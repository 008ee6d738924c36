"""A micro-batch that spans a model switch: each query is embedded by the model that prepared it
(the one of the version its request is pinned to), never by whichever model is live at batch time."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from serve import embedding
from serve.service import SearchService


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """The built-in pretrained pipeline and a second real one (same trunk, another seeded projection)."""
    from embed.model import EmbedderConfig, EmbeddingNet
    from embed.pipeline import load_pipeline, make_checkpoint

    try:
        old = load_pipeline(None)
    except Exception as exc:  # noqa: BLE001 - the default weights are an offline asset
        pytest.skip(f"default model unavailable: {exc}")
    path = tmp_path_factory.mktemp("model") / "other.ckpt"
    make_checkpoint(EmbeddingNet.pretrained(EmbedderConfig(projection_seed=1))).save(path)
    new = load_pipeline(str(path))
    assert new.model_hash != old.model_hash
    return old, new


def test_each_query_of_a_mixed_batch_is_embedded_by_its_own_model(tmp_path, two_models):
    old, new = two_models
    service = SearchService(tmp_path / "index", tmp_path / "store", embedder=new, live_updates=False)
    photos = [Image.fromarray(data.chelsea()).convert("RGB"), Image.fromarray(data.coffee()).convert("RGB")]
    prepared = [embedding.prepare(old, photos[0]), embedding.prepare(new, photos[1]), embedding.prepare(old, photos[1])]
    batched = service._embed_batch(prepared)
    alone = [embedding.embed_prepared(p.pipeline, [p])[0] for p in prepared]
    for got, want in zip(batched, alone):
        np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-4)
    # the same photo through the two models: different vectors, so the check above can fail
    assert np.abs(batched[1].vectors - batched[2].vectors).max() > 0.1
