"""The ``imgsearch`` console command: argument parsing and dispatch, nothing else.

Each subcommand names the plain function that does the work as
``"module:function"``; the module is imported only when that subcommand runs,
so ``imgsearch --help`` never loads torch or faiss. A handler takes the parsed
``argparse.Namespace`` and returns an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from imgsearch.argtypes import positive_float, positive_int, recall_fraction
from imgsearch.errors import ImgsearchError, NotImplementedYet
from imgsearch.logs import FORMATS, configure_logging

EXIT_OK, EXIT_FAILED, EXIT_BAD_ARGS = 0, 1, 2

# Subcommands whose issue has not landed point at None.
HANDLERS: dict[str, str | None] = {
    "demo": "serve.commands:run_demo_command",
    "embed": "index.jobs.commands:embed_command",
    "build": "index.ann.commands:build_command",
    "search": "index.ann.commands:search_command",
    "serve": "serve.commands:serve_command",
    "dedup": "index.jobs.commands:dedup_command",
    "rebuild": "index.jobs.commands:rebuild_command",
    "verify": "index.ann.commands:verify_command",
    "train": "train.commands:run_train_command",
}


def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--factory", default="auto", help="faiss index_factory string, or 'auto' (default)")
    p.add_argument("--shards", type=positive_int, default=1, help="number of id-range shards (default 1)")
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto", help="use GPUs when present (default auto)")
    p.add_argument("--target-recall", type=recall_fraction, default=0.95, help="recall@10 that auto-tuning must reach")
    p.add_argument("--metric", choices=["l2", "ip"], default=None, help="distance (default: ip for the store, l2 for --vectors)")
    p.add_argument("--ram-budget", "--memory-budget", dest="memory_budget", default=None, metavar="SIZE",
                   help="RAM the opened index may use, e.g. 2GB: --factory auto chooses within it (codes memory-mapped "
                        "from disk when they do not fit) and a factory that cannot fit is refused (default: half of RAM)")


def _add_mass_delete_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="let the run delete more than 10%% of the store's live items (refused otherwise)")


# Each subcommand's --help ends with these.
EXAMPLES = {
    "demo": "imgsearch demo --port 8080        # then open http://127.0.0.1:8080/ and drop a photo",
    "embed": "imgsearch embed catalog.csv --store store/",
    "build": "imgsearch build --store store/ --index-root index/\n"
             "  imgsearch build --vectors x.npy --ids ids.npy --metric ip --index-root index/",
    "search": "imgsearch search --index-root index/ photo.jpg -k 5\n"
              "  imgsearch search --index-root index/ --vectors q.npy --output results.jsonl",
    "serve": "imgsearch serve --index-root index/ --store store/ --port 8080 --workers 2",
    "dedup": "imgsearch dedup --store store/ --index-root index/ --output groups.jsonl",
    "rebuild": "imgsearch rebuild catalog.csv --store store/ --index-root index/ --notify http://127.0.0.1:8080",
    "verify": "imgsearch verify index/",
    "train": "imgsearch train catalog.csv --output model.pt --epochs 4",
}


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("imgsearch")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        import configparser
        from pathlib import Path

        cfg = configparser.ConfigParser()
        cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
        return cfg.get("metadata", "version", fallback="unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgsearch", description="Image similarity search: embed, index, serve.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug lines, and the INFO lines of libraries (faiss, gunicorn)")
    parser.add_argument("--log-format", choices=FORMATS, default="auto",
                        help="log lines as text or as JSON objects, one per line (default auto: text on a terminal, "
                             "else json)")
    parser.add_argument("--version", action="version", version=f"imgsearch {_version()}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(sub, "demo", help="real sample images -> index -> server + web page")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--workdir", default="demo-data", help="where the demo catalog, store and index go")
    p.add_argument("--no-serve", action="store_true", help="build everything, then exit instead of serving")

    p = _command(sub, "embed", help="ingest a catalog: detect, embed, store vectors and metadata")
    p.add_argument("catalog", metavar="CATALOG", help="CSV or JSONL catalog file")
    p.add_argument("--store", required=True, metavar="STORE", help="catalog store folder (created when missing)")
    p.add_argument("--model", metavar="CKPT", default=None,
                   help="embedding checkpoint (default: the store's own model; a new store gets --projection's)")
    p.add_argument("--projection", choices=["catalog", "fixed"], default=None,
                   help="without --model: 'catalog' (default for a new store) fits a PCA-whitening of the pretrained "
                        "features on the catalog's images into STORE/projection.ckpt; 'fixed' is the seeded built-in one")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images embedded per batch (default 32)")
    p.add_argument("--distributed", metavar="ray[:ADDRESS]", default=None, help="run on a Ray cluster: 'ray' starts a local one, 'ray:ADDRESS' joins a running one")
    _add_mass_delete_option(p)

    p = _command(sub, "build", help="build an index version from the store or a .npy of vectors")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", metavar="STORE", help="index this catalog store's vectors")
    src.add_argument("--vectors", metavar="X.npy", help="index an N x d float32 or uint8 .npy")
    p.add_argument("--ids", metavar="IDS.npy", default=None, help="int64 ids of the --vectors rows (default 0..N-1)")
    p.add_argument("--index-root", required=True, metavar="INDEX_ROOT", help="folder of index versions; the new one becomes CURRENT")
    _add_build_options(p)
    p.add_argument("--tune-queries", metavar="Q.npy", default=None,
                   help="n x d query vectors like real ones (not in the index) to tune and measure recall on "
                        "(default: 500 stored vectors, each with its own id left out)")

    p = _command(sub, "search", help="search the live index with images or query vectors")
    p.add_argument("--index-root", required=True, metavar="INDEX_ROOT", help="folder of index versions; CURRENT's is searched")
    p.add_argument("--store", metavar="STORE", default=None,
                   help="store naming the products (default: the store the version was built from)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="query photos")
    p.add_argument("--vectors", metavar="Q.npy", default=None, help="query vectors: an n x d .npy")
    p.add_argument("-k", type=positive_int, default=10, help="products per query (default 10)")
    p.add_argument("--output", metavar="FILE", default=None,
                   help="write the JSON Lines here (atomically) instead of stdout; with --vectors, a .npz name "
                        "gets the raw ids and scores arrays")
    p.add_argument("--model", metavar="CKPT", default=None, help="embedding checkpoint for IMAGE queries (default: the live version's model)")

    p = _command(sub, "serve", help="serve the HTTP API and web page")
    p.add_argument("--index-root", required=True, metavar="INDEX_ROOT", help="folder of index versions; CURRENT's is served")
    p.add_argument("--store", required=True, metavar="STORE", help="catalog store of the products (API writes go here)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("--model", metavar="CKPT", default=None, help="embedding checkpoint for image queries (default: pretrained)")
    p.add_argument("--threads", type=positive_int, default=16, help="request threads per worker (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="micro-batching window (1-5 ms): concurrent queries within it are embedded/searched together; "
                        "0 = off (default: on a CPU-only host it measured slower)")
    p.add_argument("--max-batch", type=positive_int, default=64, help="largest micro-batch (default 64)")
    p.add_argument("--admin-token-env", default="IMGSEARCH_ADMIN_TOKEN", metavar="NAME",
                   help="environment variable holding the admin Bearer token (default IMGSEARCH_ADMIN_TOKEN)")
    p.add_argument("--watch-current", type=float, default=0.0, metavar="SECONDS",
                   help="poll INDEX_ROOT/CURRENT and switch versions when it changes; 0 = off (default; 2 with --workers > 1)")
    p.add_argument("--shard-of", default=None, metavar="INDEX_ROOT:i/n", help="serve only shard i of n of the live version")
    p.add_argument("--shards", default=None, metavar="URL,URL,...", help="front server: fan queries out to these shard servers")
    p.add_argument("--shard-timeout-ms", type=float, default=1000.0, help="per-shard timeout of a front server (default 1000)")
    p.add_argument("--decode-pixel-budget", type=positive_int, default=None, metavar="PIXELS",
                   help="decoded image pixels a worker holds at once; a photo that does not fit within 1 s is answered "
                        "503 with Retry-After (default 80000000: two images at the 40 Mpx limit)")
    p.add_argument("--header-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="a request head must arrive within this of its first byte, else 408 (default 10)")
    p.add_argument("--body-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="a request body must arrive within this of its head, else 408 (default 60)")
    p.add_argument("--shard-token-env", default="IMGSEARCH_SHARD_TOKEN", metavar="NAME",
                   help="environment variable holding the shard Bearer token that a front sends and its shard servers "
                        "require (default IMGSEARCH_SHARD_TOKEN)")

    p = _command(sub, "dedup", help="find groups of near-duplicate products")
    p.add_argument("--store", required=True, metavar="STORE", help="catalog store whose products are compared")
    p.add_argument("--index-root", required=True, metavar="INDEX_ROOT", help="folder of index versions built from STORE")
    p.add_argument("--threshold", type=float, default=None,
                   help="similarity (inner product of the embeddings) a pair must reach (default: calibrated on planted "
                        "copies of the store's own images for --target-precision, else 0.90 when no image file is "
                        "reachable; with --verify the candidate threshold, default 0.60)")
    p.add_argument("--model", metavar="CKPT", default=None,
                   help="the store's embedding checkpoint, for calibrating the default threshold (default: the one the store records)")
    p.add_argument("--output", required=True, metavar="GROUPS.jsonl", help="groups file to write, one JSON object per group")
    p.add_argument("--calibrate", metavar="LABELS.jsonl", default=None,
                   help='pick the threshold from labelled product pairs ({"a", "b", "duplicate"} per line), then run')
    p.add_argument("--target-precision", type=recall_fraction, default=0.95, help="precision --calibrate and the default calibration aim for (default 0.95)")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours searched per stored vector (default 10)")
    p.add_argument("--block-size", type=positive_int, default=4096, help="query vectors per block (default 4096)")
    p.add_argument("--no-rescore", action="store_true", help="skip the exact re-scoring of pairs with stored vectors")
    p.add_argument("--nprobe", type=positive_int, default=None, help="override the index's tuned nprobe")
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto", help="search on GPUs when present (default auto)")
    p.add_argument("--distributed", metavar="ray[:ADDRESS]", default=None, help="run on a Ray cluster: 'ray' starts a local one, 'ray:ADDRESS' joins a running one")
    p.add_argument("--verify", action="store_true",
                   help="confirm each candidate pair on the images themselves (aligned, colour-invariant structure)")
    p.add_argument("--verify-threshold", type=float, default=None, metavar="D",
                   help="largest image disagreement --verify accepts (default 0.06; --calibrate picks it)")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder that relative catalog image paths resolve against, for records stored without one")

    p = _command(sub, "rebuild", help="cron entry: embed new/changed -> build -> validate -> publish")
    p.add_argument("catalog", metavar="CATALOG", help="CSV or JSONL catalog file")
    p.add_argument("--store", required=True, metavar="STORE", help="catalog store folder (created when missing)")
    p.add_argument("--index-root", required=True, metavar="INDEX_ROOT", help="folder of index versions; a validated new one becomes CURRENT")
    p.add_argument("--model", metavar="CKPT", default=None,
                   help="embedding checkpoint (default: the store's own model; a new store gets the catalog projection)")
    p.add_argument("--keep", type=positive_int, default=3, help="index versions kept (the live one always; default 3)")
    p.add_argument("--notify", metavar="URL,...", default=None,
                   help="servers to POST /v1/admin/reload after publishing ($IMGSEARCH_ADMIN_TOKEN)")
    p.add_argument("--target-recall", type=recall_fraction, default=0.95, help="recall@10 the new version must reach (default 0.95)")
    p.add_argument("--factory", default=None, help="faiss factory (default: the live version's hand-picked one, else auto)")
    p.add_argument("--shards", type=positive_int, default=None, help="shards (default: the live version's)")
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto", help="build on GPUs when present (default auto)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images embedded per batch (default 32)")
    p.add_argument("--force", action="store_true", help="build even when the store has not changed")
    p.add_argument("--distributed", metavar="ray[:ADDRESS]", default=None, help="run on a Ray cluster: 'ray' starts a local one, 'ray:ADDRESS' joins a running one")
    _add_mass_delete_option(p)

    p = _command(sub, "verify", help="check every file of an index version against its manifest's checksums")
    p.add_argument("index_root", metavar="INDEX_ROOT", help="folder of index versions")
    p.add_argument("--version", default=None, metavar="V", help="the version to check (default: the one CURRENT names)")

    p = _command(sub, "train", help="train the detector and embedding network on a catalog")
    from train.options import add_train_options  # argparse only: keeps --help free of torch

    add_train_options(p)
    return parser


def _resolve(command: str):
    target = HANDLERS.get(command)
    if target is None:
        raise NotImplementedYet("not implemented yet")
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _os_error_text(exc: OSError) -> str:
    paths = " -> ".join(repr(str(name)) for name in (exc.filename, exc.filename2) if name is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{paths}: {reason}" if paths else reason


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad arguments
    configure_logging(args.log_format, args.verbose)
    try:
        return int(_resolve(args.command)(args) or EXIT_OK)
    except ImgsearchError as exc:
        print(f"imgsearch {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:  # a path the job cannot create, read or write: one line, not a traceback
        print(f"imgsearch {args.command}: error: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"imgsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
