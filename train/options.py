"""``imgsearch train`` options: argparse only, so ``imgsearch --help`` stays free of torch."""

from __future__ import annotations

import argparse

from imgsearch.argtypes import fraction, non_negative_float, positive_int


def add_train_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The INTERFACE.md options (CATALOG, --output, --epochs, --resume) and the tuning knobs."""
    p.add_argument("catalog", metavar="CATALOG", help="catalog CSV/JSONL; a split.json next to it is honoured")
    p.add_argument("--output", required=True, metavar="CKPT", help="checkpoint to write (after every epoch)")
    p.add_argument("--epochs", type=positive_int, default=None, help="total epochs (default 4; on --resume, the checkpoint's)")
    p.add_argument("--resume", metavar="CKPT", default=None, help="continue a run from its checkpoint")
    p.add_argument("--loss", choices=["multisimilarity", "triplet"], default=None, help="metric loss (default triplet: best measured R@1)")
    p.add_argument("--seed", type=int, default=None, help="seed of views, scenes and batches (default 0)")
    p.add_argument("--views", type=positive_int, default=None, help="shopper views per train product (default 24)")
    p.add_argument("--scenes", type=positive_int, default=None, help="detector training scenes (default 2800)")
    p.add_argument("--studio-scenes", type=fraction, default=None, metavar="FRACTION",
                   help="share of the detector scenes that are train products' own catalog shots (default 0.15)")
    p.add_argument("--detector-passes", type=positive_int, default=None,
                   help="passes over the detector scenes per epoch (default 1)")
    p.add_argument("--embed-trainable-from", type=positive_int, default=None, metavar="BLOCK",
                   help="MobileNetV2 blocks [BLOCK:] of the embedder learn, the rest is frozen and cached (default 14)")
    p.add_argument("--detector-trainable-from", type=positive_int, default=None, metavar="BLOCK",
                   help="MobileNetV2 blocks [BLOCK:] of the detector learn, 1..19; below 14 the stride-16 map learns too (default 11)")
    p.add_argument("--head-init", choices=["fixed", "whitened"], default=None,
                   help="the embedder head's start: the fixed projection, or the whitening of the pretrained features "
                        "fitted on the training views (default whitened)")
    p.add_argument("--transfer-weight", type=non_negative_float, default=None, metavar="W",
                   help="weight of the term that keeps the in-batch similarities of the pretrained model (category "
                        "transfer; 0 turns it off; default 4)")
    p.add_argument("--no-detector", action="store_true", help="train the embedder only")
    p.add_argument("--max-products", type=positive_int, default=None, help="train on at most N train products")
    p.add_argument("--image-size", type=positive_int, default=None, help="embedder input side (default 224)")
    p.add_argument("--detector-image-size", type=positive_int, default=None, help="detector input side (default 320)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained-baseline row of the evaluation")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="progress bars (default: on a terminal)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_train_options(argparse.ArgumentParser(prog="imgsearch train", description="train the detector and embedder"))
