"""``make train-demo``: build the real sample set, train on its TRAIN products, evaluate on its held-out ones.

Everything lands under ``--workdir`` (default ``demo-data/train``): ``sample/`` (catalog, split, queries)
and ``model.ckpt``, the checkpoint ``imgsearch demo`` picks up when present.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from imgsearch.sample_data import build_sample_set
from train.commands import main as train_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-data/train")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2: the budget machine)")
    args, passthrough = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    workdir = Path(args.workdir)
    sample = build_sample_set(workdir / "sample", seed=0)
    logging.info("sample set ready in %.0f s: %d products, %d eval queries", time.perf_counter() - started, sample.n_products, sample.n_queries)
    train_main([str(sample.catalog_csv), "--output", str(workdir / "model.ckpt"), *passthrough])
    logging.info("train-demo finished in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
