"""Pixel verification of duplicate candidates (embed/verify.py) on real tuxpaint catalog shots."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from embed import verify as V
from imgsearch import assets
from imgsearch.errors import MissingAsset

# Products with different content: photos, drawings, texture, thin structure.
ORIGINALS = ("animals.birds.duck", "clothes.t_poloshirt", "seasonal.hanukkah.dreydl-hay", "food.pizza",
             "vehicles.auto.sedan", "seasonal.halloween.grave-a")
# Distinct products that look alike: one letter, collar vs plain neck, hat shape, bird pose, tombstones.
LOOKALIKES = (
    ("seasonal.hanukkah.dreydl-gimmel", "seasonal.hanukkah.dreydl-nun"),
    ("seasonal.hanukkah.dreydl-hay", "seasonal.hanukkah.dreydl-shin"),
    ("clothes.t_poloshirt", "clothes.t_tshirt"),
    ("clothes.hats.blue_fedora", "clothes.hats.green_fedora"),
    ("animals.birds.drake", "animals.birds.duck"),
    ("seasonal.halloween.grave-a", "seasonal.halloween.grave-b"),
)


@pytest.fixture(scope="module")
def shots() -> dict:
    from imgsearch.sample_data import catalog_shot, list_products

    try:
        products = {p.product_id: p for p in list_products(assets.tuxpaint_stamps_dir())}
    except MissingAsset as exc:
        pytest.skip(f"asset missing, run make data: {exc}")
    wanted = set(ORIGINALS) | {p for pair in LOOKALIKES for p in pair}
    return {pid: jpeg(catalog_shot(products[pid]), 92) for pid in sorted(wanted)}


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def planted_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """The bench's transforms: JPEG q25, 45% resize, 80% crop, recolour (hue + saturation + brightness)."""
    w, h = image.size
    if kind == "jpeg":
        return jpeg(image, 25)
    if kind == "resize":
        return image.resize((int(w * 0.45), int(h * 0.45)), Image.BILINEAR)
    if kind == "crop":
        dx, dy = int(w * rng.uniform(0, 0.2)), int(h * rng.uniform(0, 0.2))
        return image.crop((dx, dy, dx + int(w * 0.8), dy + int(h * 0.8)))
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(20, 60))) % 256
    out = Image.fromarray(hsv, "HSV").convert("RGB")
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.15))


KINDS = ("jpeg", "resize", "crop", "recolour")


def test_accepts_planted_copies_of_real_images(shots):
    rng = np.random.default_rng(0)
    images = {pid: shots[pid] for pid in ORIGINALS}
    pairs, kinds = [], []
    for pid in ORIGINALS:
        for kind in KINDS:
            images[f"{pid}/{kind}"] = jpeg(planted_copy(shots[pid], kind, rng), 92)
            pairs.append((pid, f"{pid}/{kind}"))
            kinds.append(kind)
    res = V.verify_pairs(pairs, images.__getitem__)
    rejected = [(p, float(d)) for p, ok, d in zip(pairs, res.accepted, res.disagreement) if not ok]
    assert not rejected, rejected
    assert res.skipped == 0 and (res.overlap >= 0.9).all()
    # The crop keeps 80 % of each side, so the aligned scale says so (work sizes 256 vs 256 px).
    m = V.match_images(V.prepare(images[ORIGINALS[0]]), V.prepare(images[f"{ORIGINALS[0]}/crop"]))
    assert m.scale == pytest.approx(0.8, abs=0.02)


def test_rejects_distinct_lookalike_products(shots):
    pairs = list(LOOKALIKES)
    res = V.verify_pairs(pairs, shots.__getitem__, exhaustive=True)
    accepted = [(p, float(d)) for p, ok, d in zip(pairs, res.accepted, res.disagreement) if ok]
    assert not accepted, accepted
    # ...also when the look-alike is itself a re-encoded or resized copy.
    rng = np.random.default_rng(1)
    copies = {f"{a}/copy": jpeg(planted_copy(shots[a], KINDS[i % 4], rng), 92) for i, (a, _) in enumerate(LOOKALIKES)}
    images = {**shots, **copies}
    res = V.verify_pairs([(f"{a}/copy", b) for a, b in LOOKALIKES], images.__getitem__)
    assert not res.accepted.any(), res.disagreement
    # A margin, not a coin toss: the one-letter dreidels sit well above the threshold.
    assert res.disagreement.min() > 1.5 * V.DEFAULT_MAX_DISAGREEMENT


def test_small_rotation_is_searched(shots):
    image = shots["vehicles.auto.sedan"]
    rotated = image.rotate(4, resample=Image.BILINEAR, fillcolor=image.getpixel((0, 0)))
    a, b = V.prepare(image), V.prepare(jpeg(rotated, 60))
    m = V.match_images(a, b)
    assert m.accepted(V.VerifyConfig()), m
    # Without the rotation search, the same pair is not explained by scale and shift alone.
    assert not V.match_images(a, b, V.VerifyConfig(max_rotation=0)).accepted(V.VerifyConfig())


def test_is_symmetric_enough_and_identity_is_perfect(shots):
    a = V.prepare(shots["animals.birds.duck"])
    assert V.match_images(a, a).disagreement < 0.005
    rng = np.random.default_rng(2)
    b = V.prepare(planted_copy(shots["animals.birds.duck"], "resize", rng))
    ab, ba = V.match_images(a, b), V.match_images(b, a)
    assert ab.scale == pytest.approx(1 / ba.scale, rel=0.02)
    assert ab.accepted(V.VerifyConfig()) and ba.accepted(V.VerifyConfig())


def test_missing_and_undecodable_images_are_counted_skips(shots, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    good = tmp_path / "good.jpg"
    shots["food.pizza"].save(good, "JPEG", quality=92)
    sources = {"good": str(good), "copy": jpeg(shots["food.pizza"], 25), "missing": str(tmp_path / "gone.jpg"),
               "bad": str(bad)}
    res = V.verify_pairs([("good", "missing"), ("good", "copy"), ("bad", "copy"), ("missing", "bad")],
                         sources.__getitem__)
    assert res.accepted.tolist() == [False, True, False, False]
    assert res.skipped == 3 and np.isinf(res.disagreement[[0, 2, 3]]).all()
    assert any("gone.jpg" in e for e in res.errors) and any("bad.jpg" in e for e in res.errors)


def test_choose_verify_thresholds_on_labelled_pairs():
    sim = np.array([0.95, 0.70, 0.62, 0.97, 0.93, 0.91, 0.40, 0.85])
    dis = np.array([0.01, 0.02, 0.03, 0.20, 0.04, 0.30, 0.01, np.inf])
    dup = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
    got = V.choose_verify_thresholds(sim, dis, dup, 0.95)
    # Candidates keep 99 % of duplicates (lowest 0.62) less the margin; the verify threshold
    # falls halfway between the last duplicate (0.03) and the first non-duplicate (0.04).
    assert got["threshold"] == pytest.approx(0.62 - V.CANDIDATE_MARGIN, abs=0.01)
    assert got["verify_threshold"] == pytest.approx(0.035)
    assert got["precision"] == 1.0 and got["recall"] == 0.75 and got["reached"]
