"""Which model a server embeds queries with, per live index version.

A version's vectors were made by one model (manifest ``model``: its weights hash) and written to
one store (manifest ``store.path``); ``build`` also records that model's checkpoint file
(``model_checkpoint``, null for the built-in pretrained model). A query embedded by one model
and searched among another's vectors gets meaningless neighbours, so:

- a server started without ``--model`` **follows** the live version: it loads the checkpoint the
  manifest names, and when the live version switches to one of another model it loads that
  model and that version's store, and :class:`serve.live.LiveVersions` swaps embedder, store
  and index as one :class:`Backend`;
- a server started with ``--model`` keeps its model and refuses (at reload) a version of another.

A checkpoint whose weights hash is not the manifest's ``model`` is refused: the old version stays
live and the reason is logged.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from serve.updates import UpdateLog

log = logging.getLogger(__name__)

STATUS_ENV = "IMGSEARCH_DEMO_STATUS"  # the demo's server: its background training's status JSON


class ModelRefused(Exception):
    """A version this server must not serve with the model it has (or can load)."""


@dataclass(frozen=True)
class Backend:
    """The embedder and the store one version is searched with: swapped with its index, never apart."""

    model: str | None  # the embedder's weights hash
    checkpoint: str | None  # its file (None: the built-in pretrained model)
    embedder: Any  # an embed.pipeline.QueryPipeline (or anything with its methods)
    store_path: Path
    store: Any  # an opened, read-only CatalogStore
    updates: UpdateLog | None

    @property
    def kind(self) -> str:
        return model_kind(self.checkpoint)


def model_kind(checkpoint: str | None) -> str:
    """``GET /v1/model``'s ``kind``: "pretrained" (the built-in model), "catalog" (the pretrained
    trunk with a projection fitted on the catalog, no labels: its checkpoint's config beside it,
    ``<ckpt>.json``, says ``projection``), else "trained"."""
    if checkpoint is None:
        return "pretrained"
    try:
        config = json.loads(Path(str(checkpoint) + ".json").read_text())
    except (OSError, ValueError):
        return "trained"
    return "catalog" if isinstance(config, dict) and "projection" in config else "trained"


def default_pipeline_loader(checkpoint: str | None):
    from embed.pipeline import load_pipeline

    return load_pipeline(checkpoint)


def warm(pipeline) -> None:
    """One query through the model, so the first request after a switch pays no first-call cost."""
    pipeline.embed_queries([Image.new("RGB", (224, 224), (128, 128, 128))])


class ModelPolicy:
    """Decides, for each version about to go live, the Backend it is searched with.

    ``follow``: load each version's own model (a server without ``--model``); otherwise only
    check that the version's model is ``embedder_model()`` (the fixed ``--model``'s hash, or
    None while not loaded yet)."""

    def __init__(self, *, follow: bool, store_path: Path, open_store: Callable, live_updates: bool = True,
                 embedder_model: Callable[[], str | None] = lambda: None,
                 loader: Callable = default_pipeline_loader):
        self.follow = follow
        self.store_path = Path(store_path)
        self._open_store = open_store  # the server's --store, opened once, read-only
        self._live_updates = live_updates
        self._embedder_model = embedder_model
        self._loader = loader
        # Stores of other versions, opened once each: LMDB refuses a second handle on one path in a
        # process, so switching back to a store served before must reuse its handle. Never closed
        # here: requests pinned to an older version may still read through it.
        self._other_stores: dict[Path, Any] = {}

    def backend_for(self, manifest: dict, current: Backend | None, starting: bool) -> Backend | None:
        """The Backend to serve ``manifest``'s version with (``current`` when its model is the same);
        raises :class:`ModelRefused` when this server must not serve it."""
        model = manifest.get("model")
        if not self.follow:
            have = self._embedder_model()
            if not starting and model is not None and have is not None and model != have:
                raise ModelRefused(f"version {manifest.get('version')!r} holds vectors of model {model[:16]}, "
                                   f"this server embeds with --model {have[:16]}; start it without --model to follow")
            return None
        if current is not None and (model is None or model == current.model or "model_checkpoint" not in manifest):
            return current  # same model (or raw vectors, or a version built before checkpoints were recorded)
        checkpoint = manifest.get("model_checkpoint")
        if starting:
            store_path, store = self.store_path, self._open_store()
        else:
            store_path = Path((manifest.get("store") or {}).get("path") or self.store_path)
            store = self._store_at(store_path, model)
        pipeline = self._load(checkpoint, model, strict=not starting)
        updates = UpdateLog(store_path) if self._live_updates else None
        # The version's model names the pairing (a starting server may have had to accept another).
        return Backend(model or pipeline.model_hash, checkpoint, pipeline, store_path, store, updates)

    def _load(self, checkpoint: str | None, model: str | None, strict: bool):
        """The pipeline of ``checkpoint``, whose hash must be ``model``: a switch refuses otherwise;
        a starting server (with nothing else to serve) serves with a logged warning, as before."""
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise ModelRefused(f"the version's model checkpoint {checkpoint} is not a file")
        try:
            pipeline = self._loader(checkpoint)
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint refuses the version, the old one serves
            raise ModelRefused(f"the version's model checkpoint {checkpoint} does not load: {exc}") from None
        if model is not None and pipeline.model_hash != model:
            reason = (f"checkpoint {checkpoint or '(built-in pretrained model)'} has weights hash "
                      f"{pipeline.model_hash[:16]}, the version's manifest names model {model[:16]}")
            if strict:
                raise ModelRefused(reason)
            log.warning("%s: image queries are embedded by another model than the index's vectors", reason)
        warm(pipeline)
        log.info("loaded model %s from %s", pipeline.model_hash[:16], checkpoint or "the built-in pretrained model")
        return pipeline

    def _store_at(self, store_path: Path, model: str | None):
        """The opened store at ``store_path`` (the server's own --store, or one opened for an earlier
        version), checked to hold ``model``'s vectors."""
        from index.store import CatalogStore

        key = store_path.resolve()
        if key == self.store_path.resolve():
            store = self._open_store()
        elif key in self._other_stores:
            store = self._other_stores[key]
        else:
            try:
                store = self._other_stores[key] = CatalogStore.open_readonly(store_path)
            except Exception as exc:  # noqa: BLE001 - refused, the old version serves
                raise ModelRefused(f"the version's store {store_path} does not open: {exc}") from None
        if model is not None and store.model != model:
            raise ModelRefused(f"the version's store {store_path} holds vectors of model {str(store.model)[:16]}, "
                               f"not the version's {model[:16]}")
        return store


def training_status() -> dict | None:
    """The demo's background training status (:mod:`serve.demo_train`), or None when there is none."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    if body.get("state") in ("training", "embedding", "building") and isinstance(body.get("eta_s"), (int, float)):
        # The job writes on each step; between writes the estimate counts down.
        since = time.time() - float(body.get("updated_at") or time.time())
        body["eta_s"] = round(max(0.0, body["eta_s"] - since), 1)
    return body


def model_body(service) -> dict:
    """``GET /v1/model``: the live version's model, its kind, and the demo's training (or null)."""
    return {**service.model_info(), "training": training_status()}
