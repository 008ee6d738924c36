"""Switching back: a server that follows its versions' models goes A -> B -> A -> B, each version on
its own store. LMDB allows one handle per path in a process, so a store served before (the server's
own --store included) must be reused, not reopened, or the switch back is refused."""

from pathlib import Path

import numpy as np
import pytest

from index.store import CatalogStore, ItemRecord
from serve.models import ModelPolicy


def _store(path: Path, model: str, checkpoint: str | None) -> Path:
    with CatalogStore.create_or_open(path, dim=128) as store:
        v = np.eye(1, 128, dtype=np.float32)
        store.put([ItemRecord(product_id="p", image="p.jpg", content_hash=str(path))], v)
        store.set_model(model, checkpoint)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from embed.model import EmbedderConfig, EmbeddingNet
    from embed.pipeline import load_pipeline, make_checkpoint

    try:
        hash_a = load_pipeline(None).model_hash
    except Exception as exc:  # noqa: BLE001 - the default weights are an offline asset
        pytest.skip(f"default model unavailable: {exc}")
    path = tmp_path_factory.mktemp("models") / "b.ckpt"
    make_checkpoint(EmbeddingNet.pretrained(EmbedderConfig(projection_seed=7))).save(path)
    return hash_a, load_pipeline(str(path)).model_hash, str(path)


def test_a_switch_back_reuses_the_open_stores(tmp_path, models):
    hash_a, hash_b, checkpoint_b = models
    store_a = _store(tmp_path / "store-a", hash_a, None)
    store_b = _store(tmp_path / "store-b", hash_b, checkpoint_b)
    own = CatalogStore.open_readonly(store_a)  # the server's --store, as the server holds it
    policy = ModelPolicy(follow=True, store_path=store_a, open_store=lambda: own, live_updates=False)

    def manifest(model, checkpoint, store):
        return {"version": f"v-{model[:6]}", "model": model, "model_checkpoint": checkpoint, "store": {"path": str(store)}}

    try:
        a = policy.backend_for(manifest(hash_a, None, store_a), None, starting=True)
        b = policy.backend_for(manifest(hash_b, checkpoint_b, store_b), a, starting=False)
        back = policy.backend_for(manifest(hash_a, None, store_a), b, starting=False)
        again = policy.backend_for(manifest(hash_b, checkpoint_b, store_b), back, starting=False)
        assert (a.model, b.model, back.model, again.model) == (hash_a, hash_b, hash_a, hash_b)
        assert back.store is own and again.store is b.store
        assert again.store.model == hash_b and len(list(again.store.iter_live_ids())) == 1
    finally:
        own.close()
        b.store.close()


def test_model_kind_names_the_catalog_projection(tmp_path, models):
    """/v1/model's kind: the built-in model, a projection fitted on the catalog, or a trained one."""
    from embed.model import EmbeddingNet
    from embed.whitening import save_projection
    from serve.models import model_kind

    _, _, trained = models
    save_projection(EmbeddingNet.pretrained(), tmp_path / "projection.ckpt", {"images": 300})
    assert model_kind(None) == "pretrained" and model_kind(trained) == "trained"
    assert model_kind(str(tmp_path / "projection.ckpt")) == "catalog"
