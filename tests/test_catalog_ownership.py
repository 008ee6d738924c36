"""Catalog runs and API writes share one store without undoing each other; a partial catalog
cannot wipe the store; ``rebuild --notify`` reloads a real server; a failed admin write leaves
nothing; OS errors are one CLI line; a user's folder named like a package never shadows it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.pixel_embedder import PixelEmbedder
from PIL import Image

from imgsearch.cli import build_parser
from index.ann import versions
from index.jobs import rebuild as rb
from index.store import CatalogStore
from index.store.ingest import ingest_catalog
from index.store.ownership import API_SOURCE, MassDeleteRefused, catalog_source
from tests import test_serve_updates as su
from tests.test_jobs_rebuild import DIM, write_catalog
from tests.test_serve import assert_error, colour_embed
from tests.test_serve_shards import ServerProcess, http

REPO = Path(__file__).resolve().parents[1]


def _close_readers() -> None:
    """The in-process server's read handle must go before this process opens the store to write."""
    for store in su._STORES.values():
        store.close()
    su._STORES.clear()


def _rows(catalog: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(catalog.open()))
    return rows[0], rows[1:]


def _write(catalog: Path, header: list[str], rows: list[list[str]]) -> Path:
    with catalog.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return catalog


def _live_images(store, product_id: str) -> list[str]:
    return sorted(r.image for r in store.items_of_product(product_id))


def _api_writes(env):
    """Through the HTTP API: add ``api-new``, replace ``item-03``'s image, delete ``item-05``."""
    _, client = su._client(env)
    green, _ = su._png_b64((20, 220, 20))
    purple, _ = su._png_b64((160, 20, 200), seed=9)
    assert client.post("/v1/products", json={"product_id": "api-new", "image_base64": green}, headers=su.AUTH).status_code == 201
    assert client.post("/v1/products", json={"product_id": "item-03", "image_base64": purple}, headers=su.AUTH).status_code == 200
    assert client.delete("/v1/products/item-05", headers=su.AUTH).status_code == 200
    _close_readers()


# ---------------------------------------------------------------- who owns what


def test_a_catalog_run_leaves_products_written_through_the_api_alone(tmp_path):
    env = su.make_env(tmp_path)
    root, store_path, _ = env
    _api_writes(env)
    with CatalogStore.create_or_open(store_path) as store:
        summary = ingest_catalog(root / "catalog.csv", store, colour_embed, progress=False)
        assert (summary.added, summary.changed, summary.deleted, summary.api_owned) == (0, 0, 0, 2), summary.line()
        assert "api-owned 2" in summary.line()
        assert _live_images(store, "api-new")[0].startswith("uploads/")
        assert store.items_of_product("item-05") == []  # the API's delete holds
        (upload,) = _live_images(store, "item-03")  # the API's image, not the catalog's
        assert upload.startswith("uploads/")
        assert store.stats()["live"] == 12
        # A second run: still nothing to do.
        again = ingest_catalog(root / "catalog.csv", store, colour_embed, progress=False)
        assert (again.added, again.deleted, again.updated, again.api_owned) == (0, 0, 0, 2)


def test_a_changed_catalog_row_wins_over_the_api(tmp_path):
    env = su.make_env(tmp_path)
    root, store_path, _ = env
    _api_writes(env)
    catalog = root / "catalog.csv"
    header, rows = _rows(catalog)
    rows[3][3] = "Item 3, new title"  # item-03's row changed: the catalog's version comes back
    _write(catalog, header, rows)
    Image.fromarray(np.full((31, 37, 3), (240, 240, 0), np.uint8)).save(root / "q05.png")  # item-05's image changed
    with CatalogStore.create_or_open(store_path) as store:
        summary = ingest_catalog(catalog, store, colour_embed, progress=False)
        assert summary.added == 2 and summary.api_owned == 0, summary.line()
        assert _live_images(store, "item-03") == ["q03.png"]  # the API's upload is replaced
        assert store.items_of_product("item-03")[0].metadata == {"title": "Item 3, new title"}
        (back,) = store.items_of_product("item-05")
        assert back.source == catalog_source(catalog)
        expected = colour_embed([Image.open(root / "q05.png").convert("RGB")])
        np.testing.assert_allclose(store.vectors_for([back.id]), expected, atol=1e-6)
        assert _live_images(store, "api-new")[0].startswith("uploads/")  # still the API's
        # A row new to the catalog for a product the API owns: the catalog wins there too.
        rows.append(["api-new", "q00.png", "red", "From the catalog"])
        _write(catalog, header, rows)
        ingest_catalog(catalog, store, colour_embed, progress=False)
        assert _live_images(store, "api-new") == ["q00.png"]


def test_removing_a_row_deletes_only_what_this_catalog_wrote(tmp_path):
    env = su.make_env(tmp_path)
    root, store_path, _ = env
    _api_writes(env)
    header, rows = _rows(root / "catalog.csv")
    other = _write(root / "other.csv", header, [["other-1", "q01.png", "red", "Other"]])
    with CatalogStore.create_or_open(store_path) as store:
        assert ingest_catalog(other, store, colour_embed, progress=False).deleted == 0  # another catalog deletes nothing of this one
        assert store.stats()["live"] == 13
        # item-03's row (the API replaced it) and item-07's row leave the catalog.
        kept = [r for r in rows if r[0] not in ("item-03", "item-07")]
        summary = ingest_catalog(_write(root / "catalog.csv", header, kept), store, colour_embed, progress=False)
        assert summary.deleted == 1, summary.line()
        assert store.items_of_product("item-07") == []
        assert _live_images(store, "item-03")[0].startswith("uploads/")
        assert _live_images(store, "other-1") == ["q01.png"] and _live_images(store, "api-new")


def test_records_from_before_owners_were_recorded_are_read_and_adopted(tmp_path):
    """A store written before ``source`` existed: its records have no owner; the first run treats them
    as today (a missing row is deleted) and records itself as their owner."""
    catalog = write_catalog(tmp_path, 40)
    with CatalogStore.create_or_open(tmp_path / "store") as store:
        ingest_catalog(catalog, store, PixelEmbedder(DIM).embed_catalog, progress=False)
        records = list(store.iter_records())
        legacy = [json.loads(r.to_json()) for r in records]
        for fields in legacy:
            del fields["source"]
        store.put([type(records[0]).from_json(json.dumps(f).encode()) for f in legacy])
        assert {r.source for r in store.iter_records()} == {None}
        catalog = write_catalog(tmp_path, 40, drop=2)
        summary = ingest_catalog(catalog, store, PixelEmbedder(DIM).embed_catalog, progress=False)
        assert (summary.deleted, summary.unchanged) == (2, 38)
        assert {r.source for r in store.iter_records()} == {catalog_source(catalog)}


# ---------------------------------------------------------------- the mass-delete guard


def test_a_partial_catalog_refuses_before_deleting_anything(tmp_path):
    catalog = write_catalog(tmp_path, 40)
    embed = PixelEmbedder(DIM).embed_catalog
    with CatalogStore.create_or_open(tmp_path / "store") as store:
        ingest_catalog(catalog, store, embed, progress=False)
        rejects = (store.path / "rejects.jsonl").read_bytes()
        header, rows = _rows(catalog)
        _write(catalog, header, rows[:3])
        generation = store.generation
        with pytest.raises(MassDeleteRefused) as err:
            ingest_catalog(catalog, store, embed, progress=False)
        message = str(err.value)
        assert "37" in message and "40" in message and "--allow-mass-delete" in message and "\n" not in message
        assert store.generation == generation and store.stats()["live"] == 40
        assert (store.path / "rejects.jsonl").read_bytes() == rejects
        # At most 10% goes without the flag; more with it.
        _write(catalog, header, rows[:36])
        assert ingest_catalog(catalog, store, embed, progress=False).deleted == 4
        _write(catalog, header, rows[:3])
        assert ingest_catalog(catalog, store, embed, progress=False, allow_mass_delete=True).deleted == 33
        assert store.stats()["live"] == 3


def test_replaced_images_are_changes_not_deletes_for_the_guard(tmp_path):
    """A quarter of the products point at new image files: the summary says changed, and the
    mass-delete guard (10 %) does not count those swaps as deletes."""
    catalog = write_catalog(tmp_path, 20)
    embed = PixelEmbedder(DIM).embed_catalog
    with CatalogStore.create_or_open(tmp_path / "store") as store:
        ingest_catalog(catalog, store, embed, progress=False)
        header, rows = _rows(catalog)
        rng = np.random.default_rng(7)
        for row in rows[:5]:
            new = f"img/{row[0]}-new.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / new)
            row[1] = new
        _write(catalog, header, rows)
        summary = ingest_catalog(catalog, store, embed, progress=False)
        assert (summary.changed, summary.deleted, summary.added) == (5, 0, 0)
        assert store.stats()["live"] == 20
        assert _live_images(store, rows[0][0]) == [rows[0][1]]
        # Swaps do not hide real drops: 5 swaps and 3 products removed (15 %) is still refused.
        for row in rows[5:10]:
            new = f"img/{row[0]}-new.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / new)
            row[1] = new
        _write(catalog, header, rows[:-3])
        with pytest.raises(MassDeleteRefused):
            ingest_catalog(catalog, store, embed, progress=False)


def test_rebuild_refuses_a_mass_delete_and_publishes_nothing(tmp_path):
    catalog = write_catalog(tmp_path, 120)
    cfg = rb.RebuildConfig(catalog=str(catalog), store=str(tmp_path / "store"), index_root=str(tmp_path / "index"),
                           gpu="off", batch_size=16)
    first = rb.run_rebuild(cfg, PixelEmbedder(DIM))
    header, rows = _rows(catalog)
    _write(catalog, header, rows[:30])
    with pytest.raises(MassDeleteRefused, match="refusing to delete 90 of the 120"):
        rb.run_rebuild(cfg, PixelEmbedder(DIM))
    assert versions.read_current(str(tmp_path / "index")) == first.version
    cfg.allow_mass_delete = True
    again = rb.run_rebuild(cfg, PixelEmbedder(DIM))
    assert again.status == "published" and again.ingest.deleted == 90 and again.validation["ntotal"] == 30


def test_embed_and_rebuild_take_allow_mass_delete():
    parser = build_parser()
    for command in (["embed", "c.csv", "--store", "s"], ["rebuild", "c.csv", "--store", "s", "--index-root", "i"]):
        assert parser.parse_args(command).allow_mass_delete is False
        assert parser.parse_args([*command, "--allow-mass-delete"]).allow_mass_delete is True


def test_imgsearch_embed_refuses_a_partial_catalog_in_one_line(tmp_path):
    """The real command and model: a 1-row catalog against a 4-product store exits 1, deleting nothing."""
    from skimage import data

    names = ("coffee", "chelsea", "astronaut", "rocket")
    for name in names:
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((96, 96)).save(tmp_path / f"{name}.jpg")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image\n" + "".join(f"p-{n},{n}.jpg\n" for n in names))
    store = tmp_path / "store"
    run = [sys.executable, "-m", "imgsearch", "embed", str(catalog), "--store", str(store)]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    assert subprocess.run(run, capture_output=True, text=True, env=env, timeout=300).returncode == 0
    catalog.write_text("product_id,image\np-coffee,coffee.jpg\n")
    refused = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    line = _one_error_line(refused, "embed", store)
    assert line.startswith("imgsearch embed: error: refusing to delete 3 of the 4 live items")
    with CatalogStore.open_readonly(store) as opened:
        assert opened.stats()["live"] == 4
    allowed = subprocess.run([*run, "--allow-mass-delete"], capture_output=True, text=True, env=env, timeout=300)
    assert allowed.returncode == 0 and "deleted 3" in allowed.stdout


# ---------------------------------------------------------------- rebuild --notify


def test_rebuild_notify_switches_a_real_single_worker_server(tmp_path):
    catalog = write_catalog(tmp_path, 120)
    cfg = rb.RebuildConfig(catalog=str(catalog), store=str(tmp_path / "store"), index_root=str(tmp_path / "index"),
                           gpu="off", batch_size=16)
    first = rb.run_rebuild(cfg, PixelEmbedder(DIM))
    server = ServerProcess(["--index-root", cfg.index_root, "--store", cfg.store, "--workers", "1", "--threads", "4"],
                           tmp_path / "server.log", env={"IMGSEARCH_ADMIN_TOKEN": "notify-token"})
    try:
        server.wait_ready()
        assert http("GET", server.url + "/readyz")[1]["index_version"] == first.version
        write_catalog(tmp_path, 120, changed=5)
        cfg.notify = [server.url]
        os.environ["IMGSEARCH_ADMIN_TOKEN"] = "notify-token"
        try:
            second = rb.run_rebuild(cfg, PixelEmbedder(DIM))
        finally:
            del os.environ["IMGSEARCH_ADMIN_TOKEN"]
        assert second.status == "published" and second.version != first.version
        assert second.notified == {server.url: "ok"}, second.notified
        assert http("GET", server.url + "/readyz")[1]["index_version"] == second.version
        status, body = http("POST", server.url + "/v1/search", {"vector": [0.25] * DIM, "k": 3})
        assert status == 200 and body["index_version"] == second.version
    finally:
        server.kill()


def test_notify_reports_a_server_that_did_not_switch(tmp_path):
    """A 200 naming another version is not "ok": the caller learns the server stayed behind."""
    import http.server
    import threading

    class Stale(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.dumps({"index_version": "old", "previous_version": "old", "ntotal": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stale)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        out = rb.notify_servers([url], "new", token="t")
    finally:
        httpd.shutdown()
    assert "old" in out[url] and "new" in out[url] and out[url] != "ok"


# ---------------------------------------------------------------- failed admin writes


@pytest.mark.parametrize("field, value, code", [
    ("product_id", "bad\ud800id", "bad_product_id"),
    ("product_id", "tab\there", "bad_product_id"),
    ("product_id", "del\x7fchar", "bad_product_id"),
    ("category", "cat\udfff", "bad_category"),
    ("metadata", {"title": "x\ud83d"}, "bad_metadata"),
])
def test_a_bad_id_or_text_is_400_and_stores_nothing(tmp_path, field, value, code):
    env = su.make_env(tmp_path)
    service, client = su._client(env)
    image, _ = su._png_b64((20, 220, 20))
    body = {"product_id": "ok-id", "image_base64": image, field: value}
    assert_error(client.post("/v1/products", json=body, headers=su.AUTH), 400, code)
    assert not (env[1] / "uploads").exists() or not list((env[1] / "uploads").iterdir())
    assert service.live().ntotal == 12 and not (env[1] / "serve-updates.jsonl").exists()
    _close_readers()


def test_a_failed_store_write_leaves_no_upload(tmp_path):
    env = su.make_env(tmp_path)
    _, store_path, _ = env
    service, client = su._client(env)
    image, _ = su._png_b64((1, 2, 3))
    holder = subprocess.Popen([sys.executable, str(su.HELPERS / "store_writer.py"), "hold-lock", str(store_path)],
                              stdout=subprocess.PIPE, text=True, cwd=su.HELPERS.parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        response = client.post("/v1/products", json={"product_id": "z", "image_base64": image}, headers=su.AUTH)
    finally:
        holder.kill()
        holder.wait()
    assert_error(response, 503, "store_locked")
    assert not (store_path / "uploads").exists() or not list((store_path / "uploads").iterdir())
    # The same write, once the store is free, stores the upload; the product is the API's.
    assert client.post("/v1/products", json={"product_id": "z", "image_base64": image}, headers=su.AUTH).status_code == 201
    assert len(list((store_path / "uploads").iterdir())) == 1
    assert service.store().items_of_product("z")[0].source == API_SOURCE
    _close_readers()


# ---------------------------------------------------------------- OS errors on the command line


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgsearch", *argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd or REPO, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})


def _one_error_line(proc: subprocess.CompletedProcess, command: str, path: Path) -> str:
    """Exit 1, one error line naming ``path``, no traceback (INFO log lines, such as faiss's loader's, may precede it)."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"imgsearch {command}:")]
    assert len(lines) == 1 and lines[0] == proc.stderr.strip().splitlines()[-1], proc.stderr
    assert lines[0].startswith(f"imgsearch {command}: error: ") and str(path) in lines[0], lines[0]
    return lines[0]


def test_os_errors_are_one_line_exit_1_and_leave_nothing(tmp_path):
    catalog = write_catalog(tmp_path, 20)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store, index_root = tmp_path / "store", tmp_path / "index"
    line = _one_error_line(_cli("rebuild", str(catalog), "--store", str(store), "--index-root", str(blocker / "index")),
                           "rebuild", blocker)
    assert "Not a directory" in line and not store.exists()
    _one_error_line(_cli("rebuild", str(catalog), "--store", str(blocker / "store"), "--index-root", str(index_root)),
                    "rebuild", blocker)
    assert not index_root.exists()
    _one_error_line(_cli("embed", str(catalog), "--store", str(blocker / "store")), "embed", blocker)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    _one_error_line(_cli("build", "--vectors", str(tmp_path / "x.npy"), "--index-root", str(blocker / "index")),
                    "build", blocker)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "catalog.csv", "img", "x.npy"]


# ---------------------------------------------------------------- imports from any working directory


def test_folders_named_like_the_packages_in_the_working_directory_do_not_shadow_them(tmp_path):
    for name in ("index", "embed", "serve", "train", "imgsearch"):
        (tmp_path / name).mkdir()
    code = ("import embed, imgsearch, index, serve, train\n"
            "from index import open_index\n"
            "import imgsearch.cli\n"
            "print(*(m.__file__ for m in (embed, imgsearch, index, serve, train)))\n")
    for argv in (["-c", code], ["-m", "imgsearch", "--help"]):
        proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert proc.returncode == 0, proc.stderr[-2000:]
    files = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout.split()
    assert all(Path(f).is_relative_to(REPO) for f in files), files

