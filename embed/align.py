"""Pixel alignment of two images: is image B the same picture as image A?

The embedding proposes candidate pairs at a recall-oriented threshold; this module confirms a
pair only when the two images show the same picture under a geometric transform (scale,
translation, crop) and a photometric change (re-encode, recolour, brightness). numpy, scipy and
Pillow only (all core dependencies).

1. **Prepare** each image once: RGB at most ``work_size`` px on its longer side, its edge map,
   two smaller colour-invariant edge maps (``coarse_size``, ``fine_size``) and a histogram of
   edge orientations.
2. **Align** (:func:`iter_alignments`): phase correlation of the edge maps over a log-grid of
   relative scales (``min_scale``..``max_scale``) gives a translation and a peak per scale; the
   best ``candidates`` scales are refined at the medium size (1 % steps, sub-step parabola).
   The model is ``x_A = m R x_B + t``: scale, translation and a small rotation R, estimated
   from the shift between the two orientation histograms and tried when the unrotated
   alignment fails (rotations up to about 7 degrees align; ``max_rotation`` bounds the search).
3. **Compare** (:func:`compare`): both images are resampled onto the grid of the lower-resolution
   one (antialiased), and the overlap must cover ``min_overlap`` of the smaller image. Edge
   strength is the largest eigenvalue of the colour structure tensor (Di Zenzo), which is
   unchanged by a rotation of the colour space (a hue rotation, approximately) and only scaled by
   brightness/saturation; each map is normalised by its 99th percentile in the overlap. An edge
   of one image is *explained* by the other when the other has an edge at least half as strong
   within ``radius`` px. The unexplained edge strength is averaged over sliding windows of 1/16
   of the frame's longer side and the **worst window** is the pair's ``disagreement``: one
   different letter on a dreidel is a window full of unexplained edges, while a re-encoded,
   resized, cropped or recoloured copy has none anywhere.
4. **Decide**: accepted when ``disagreement <= max_disagreement`` for one of the aligned
   candidates (tried in order, stopping at the first accepted) and the overlap is large enough.

Cost (2 shared CPU cores): ~15 ms to prepare an image (cached, LRU), ~30 ms of CPU for a
duplicate pair, ~75 ms for a pair that is rejected (every candidate alignment is tried).

Two renders that differ only in colour (a red and a yellow flag drawing) are, by construction,
the same picture under a recolour: verification accepts them like a hue-rotated copy.

Images that cannot be read (missing file, undecodable bytes) are not a crash: the pair is
skipped, counted and reported (:class:`VerifyResult`), and never accepted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from embed.image_io import load_rgb
from imgsearch.errors import BadInput

log = logging.getLogger(__name__)

# Defaults measured on the tuxpaint sample shots (planted JPEG q25 / 45 % resize / 80 % crop /
# recolour copies of all 338 products, against every pair of products in the same family): 99 %
# of copies score below 0.025, distinct look-alikes above 0.04, except drawings that differ only
# in colour. ``--calibrate`` picks both thresholds from labelled pairs instead.
DEFAULT_MAX_DISAGREEMENT = 0.06
DEFAULT_CANDIDATE_THRESHOLD = 0.60
EDGE_PERCENTILE = 99.0
EXPLAIN_RATIO = 2.0  # an edge is explained by one at least 1/EXPLAIN_RATIO as strong nearby
WINDOW_FRACTION = 1.0 / 16.0
MIN_WINDOW = 6
OVERLAP_ERODE = 3
MIN_ROTATION_DEGREES = 0.75  # below this, the unrotated alignment is as good
ORIENT_BINS = 180  # 1 degree of edge orientation per bin (2 degrees of doubled angle)
EDGE_WARP_MAX = 1.1  # shrink factor up to which an edge map is resampled as is


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    """Verification settings. ``max_disagreement`` is the calibrated threshold."""
    max_disagreement: float = DEFAULT_MAX_DISAGREEMENT
    min_overlap: float = 0.5  # share of the smaller image the aligned overlap must cover
    min_scale: float = 0.5  # relative scale range searched (images normalised to the same longer side)
    max_scale: float = 2.0
    work_size: int = 256
    coarse_size: int = 48
    fine_size: int = 128
    coarse_step: float = 0.05  # log-scale step of the coarse search
    fine_step: float = 0.01
    candidates: int = 2  # coarse scales refined and compared
    max_rotation: float = 10.0  # degrees; 0 = scale and translation only
    radius: int = 2  # px an edge may move and still be explained
    max_image_pairs: int = 2  # per product pair (dedup): image pairs tried, most similar first
    cache_images: int = 256  # prepared images kept (LRU, ~0.5 MB each)

    def check(self) -> None:
        if not 0.0 <= self.max_disagreement <= 1.5:
            raise BadInput(f"verify threshold (max disagreement) must be in [0, 1.5], got {self.max_disagreement!r}")
        if not 0.0 < self.min_overlap <= 1.0:
            raise BadInput(f"min_overlap must be in (0, 1], got {self.min_overlap!r}")
        if not 0.0 < self.min_scale < 1.0 < self.max_scale:
            raise BadInput(f"scale range must contain 1, got {self.min_scale}..{self.max_scale}")
        if self.candidates < 1 or self.max_image_pairs < 1:
            raise BadInput("candidates and max_image_pairs must be >= 1")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class ImageUnavailable(BadInput):
    """An image of a pair cannot be read or decoded; the pair is skipped, not accepted."""
    code = "image_unavailable"


# ---------------------------------------------------------------- images


def _ndi():
    from scipy import ndimage  # scipy ships with scikit-image, a core dependency

    return ndimage


def _fft():
    from scipy import fft

    return fft


def to_rgb_image(source) -> Image.Image:
    """A PIL RGB image from a PIL image, a path or bytes (decoded with the catalog's safe decoder)."""
    try:
        return load_rgb(source)
    except BadInput as exc:
        raise ImageUnavailable(str(exc)) from None


def _resize_array(x: np.ndarray, factor: float) -> np.ndarray:
    """Resize a float32 H x W map by ``factor`` (box filter down, bilinear up)."""
    h, w = x.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(x, "F").resize(size, Image.BILINEAR if factor >= 1 else Image.BOX))


def _resized_rgb(image: Image.Image, longer: int, exact: bool = False) -> np.ndarray:
    """RGB float32 in [0, 1], longer side ``longer`` (at most ``longer`` unless ``exact``)."""
    factor = longer / max(image.size)
    if factor < 1 or (exact and factor != 1):
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.LANCZOS if longer > 64 else Image.BOX)
    return np.asarray(image, np.float32) / 255.0


def edge_strength(rgb: np.ndarray, sigma: float = 1.0, orientation: bool = False):
    """sqrt of the largest eigenvalue of the colour structure tensor (Di Zenzo), H x W float32;
    with ``orientation``, also the histogram of edge orientations (:func:`orientation_histogram`)."""
    ndi = _ndi()
    jxx = jyy = jxy = np.float32(0.0)
    for c in range(rgb.shape[2]):
        ch = ndi.gaussian_filter(rgb[..., c], sigma) if sigma else rgb[..., c]
        gx = ndi.sobel(ch, 1) * np.float32(0.125)
        gy = ndi.sobel(ch, 0) * np.float32(0.125)
        jxx, jyy, jxy = jxx + gx * gx, jyy + gy * gy, jxy + gx * gy
    half_trace = (jxx + jyy) * 0.5
    root = np.sqrt(((jxx - jyy) * 0.5) ** 2 + jxy * jxy)
    strength = np.sqrt(half_trace + root).astype(np.float32)
    if not orientation:
        return strength
    return strength, orientation_histogram(np.arctan2(2.0 * jxy, jxx - jyy), 2.0 * root)


def orientation_histogram(double_angle: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Histogram of edge orientations (doubled angles, so an edge and its reverse agree) over
    ``ORIENT_BINS`` bins, weighted by edge contrast and normalised to unit length."""
    bins = ((double_angle + np.pi) * (ORIENT_BINS / (2.0 * np.pi))).astype(np.int64) % ORIENT_BINS
    hist = np.bincount(bins.ravel(), weights=weight.ravel(), minlength=ORIENT_BINS)
    return (hist / (np.linalg.norm(hist) + 1e-12)).astype(np.float32)


@dataclasses.dataclass
class Prepared:
    """One image ready for verification: RGB at the work size and edge maps at two sizes."""
    rgb: np.ndarray  # uint8 H x W x 3 at the work size
    edges: np.ndarray  # edge strength at the work size
    coarse: np.ndarray
    fine: np.ndarray
    orient: np.ndarray  # orientation histogram of the fine map (rotation estimate)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[:2]


def prepare(source, cfg: VerifyConfig | None = None) -> Prepared:
    cfg = cfg or VerifyConfig()
    image = to_rgb_image(source)
    rgb = _resized_rgb(image, cfg.work_size)
    fine, orient = edge_strength(_resized_rgb(image, cfg.fine_size, exact=True), orientation=True)
    return Prepared(np.round(rgb * 255).astype(np.uint8), edge_strength(rgb),
                    edge_strength(_resized_rgb(image, cfg.coarse_size, exact=True)), fine, orient)


# ---------------------------------------------------------------- alignment


@dataclasses.dataclass(frozen=True)
class Alignment:
    """``x_A = scale * R(angle) x_B + (ty, tx)`` in work-size pixel coordinates (row, col);
    ``peak``: the phase-correlation peak."""
    scale: float
    ty: float
    tx: float
    peak: float
    angle: float = 0.0  # radians

    def matrix(self) -> np.ndarray:
        return self.scale * _rotation_matrix(self.angle)


def _place(x: np.ndarray, oy: int, ox: int, size: int) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    h, w = x.shape
    y0, x0, y1, x1 = max(oy, 0), max(ox, 0), min(oy + h, size), min(ox + w, size)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = x[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return out


def _subpixel(m: float, c: float, p: float) -> float:
    den = m - 2.0 * c + p
    return 0.0 if den >= 0 else float(np.clip(0.5 * (m - p) / den, -0.5, 0.5))


def _peak(r: np.ndarray) -> tuple[float, float, float]:
    n0, n1 = r.shape
    dy, dx = divmod(int(np.argmax(r)), n1)
    c = float(r[dy, dx])
    oy = _subpixel(r[(dy - 1) % n0, dx], c, r[(dy + 1) % n0, dx])
    ox = _subpixel(r[dy, (dx - 1) % n1], c, r[dy, (dx + 1) % n1])
    dy = dy if dy < n0 // 2 else dy - n0
    dx = dx if dx < n1 // 2 else dx - n1
    return c, dy + oy, dx + ox


def phase_scan(ea: np.ndarray, eb: np.ndarray, scales: Sequence[float], size: int,
               offset: tuple[float, float] = (0.0, 0.0), whiten: float = 1.0) -> list[tuple[float, float, float, float]]:
    """Phase correlation of ``ea`` against ``eb`` resized by each scale and pre-shifted by ``offset``
    (in ``ea`` pixels). Returns ``(peak, scale, dy, dx)`` with ``ea(y) ~ eb_scaled(y - d)``."""
    fft = _fft()
    fa = fft.rfft2(_place(ea, 0, 0, size))
    stack = np.empty((len(scales), size, size), np.float32)
    shifts = []
    for i, s in enumerate(scales):
        oy, ox = int(round(offset[0])), int(round(offset[1]))
        stack[i] = _place(_resize_array(eb, s), oy, ox, size)
        shifts.append((oy, ox))
    cross = fa[None] * np.conj(fft.rfft2(stack, axes=(1, 2)))
    if whiten:
        mag = np.abs(cross)
        if whiten != 1.0:
            mag **= whiten
        mag += np.float32(1e-3) * mag.max() + np.float32(1e-20)
        cross /= mag
    r = fft.irfft2(cross, s=(size, size), axes=(1, 2))
    out = []
    for i, s in enumerate(scales):
        peak, dy, dx = _peak(r[i])
        out.append((peak, float(s), dy + shifts[i][0], dx + shifts[i][1]))
    return out


def _coarse_candidates(a: Prepared, b: Prepared, cfg: VerifyConfig) -> list[tuple[float, float, float, float]]:
    step = cfg.coarse_step
    ks = np.arange(np.floor(np.log(cfg.min_scale) / step), np.ceil(np.log(cfg.max_scale) / step) + 1)
    size = int(np.ceil(cfg.coarse_size * (1 + cfg.max_scale) / 16) * 16)
    scan = sorted(phase_scan(a.coarse, b.coarse, np.exp(ks * step), size), reverse=True)
    picked: list[tuple[float, float, float, float]] = []
    for cand in scan:  # distinct scales only
        if all(abs(np.log(cand[1] / p[1])) > 1.5 * step for p in picked):
            picked.append(cand)
        if len(picked) == cfg.candidates:
            break
    return picked


def _rotation_matrix(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _rotated(x: np.ndarray, angle: float) -> np.ndarray:
    """``x`` rotated by ``angle`` about its centre: out(R (p - c) + c) = x(p)."""
    ndi = _ndi()
    inv = _rotation_matrix(-angle)
    c = (np.array(x.shape, np.float64) - 1.0) / 2.0
    return ndi.affine_transform(x, inv, offset=c - inv @ c, order=1, mode="constant", cval=0.0)


def _refine(a: Prepared, b: Prepared, coarse: tuple[float, float, float, float], cfg: VerifyConfig,
            angle: float = 0.0) -> Alignment:
    """Scale (1 % steps around the coarse one, then a parabola) and shift at the fine size, with
    B's map rotated by ``angle``; returned in work-size pixels."""
    _, s, dy, dx = coarse
    k = cfg.fine_size / cfg.coarse_size
    size = int(np.ceil((cfg.fine_size + 16) / 16) * 16)
    n = int(np.ceil(0.5 * cfg.coarse_step / cfg.fine_step)) + 1
    scales = s * np.exp(np.arange(-n, n + 1) * cfg.fine_step)
    offset = (dy * k, dx * k)
    fb = _rotated(b.fine, angle) if angle else b.fine
    scan = phase_scan(a.fine, fb, scales, size, offset)
    i = int(np.argmax([r[0] for r in scan]))
    best = scan[i]
    if 0 < i < len(scan) - 1:  # parabola over log-scale, then the shift at that scale
        frac = _subpixel(scan[i - 1][0], scan[i][0], scan[i + 1][0])
        if abs(frac) > 0.05:
            sub = phase_scan(a.fine, fb, [scan[i][1] * np.exp(frac * cfg.fine_step)], size, offset)[0]
            if sub[0] >= 0.9 * scan[i][0]:
                best = sub
    peak, s, dy, dx = best
    # x_A = sa * x_Af,  x_Af = s * (R (x_Bf - c) + c) + d,  x_Bf = x_B / sb  (c: centre of B's fine map)
    sa = max(a.shape) / max(a.fine.shape)
    sb = max(b.shape) / max(b.fine.shape)
    c = (np.array(b.fine.shape, np.float64) - 1.0) / 2.0
    t = sa * (s * (c - _rotation_matrix(angle) @ c) + np.array([dy, dx]))
    return Alignment(scale=s * sa / sb, ty=float(t[0]), tx=float(t[1]), peak=peak, angle=angle)


def estimate_rotation(a: Prepared, b: Prepared, max_degrees: float) -> float:
    """Rotation of B relative to A (radians) from the circular cross-correlation of their edge
    orientation histograms, within +-``max_degrees``; 0.0 when none is found."""
    n = ORIENT_BINS
    corr = np.real(np.fft.ifft(np.fft.fft(a.orient) * np.conj(np.fft.fft(b.orient))))
    lim = int(np.ceil(max_degrees * n / 180.0))
    window = np.r_[np.arange(0, lim + 1), np.arange(n - lim, n)]
    k = int(window[np.argmax(corr[window])])
    frac = _subpixel(corr[(k - 1) % n], corr[k], corr[(k + 1) % n])
    shift = (k if k <= n // 2 else k - n) + frac
    # One bin is 1 degree of edge orientation; rotating B by +phi shifts B's histogram by +phi.
    return float(np.deg2rad(-shift * 180.0 / n))


def iter_alignments(a: Prepared, b: Prepared, cfg: VerifyConfig | None = None) -> Iterator[Alignment]:
    """Candidate alignments of B onto A, refined lazily, best coarse peak first; after the first,
    the same one with B rotated by the angle :func:`estimate_rotation` finds (when not ~0)."""
    cfg = cfg or VerifyConfig()
    for i, coarse in enumerate(_coarse_candidates(a, b, cfg)):
        yield _refine(a, b, coarse, cfg)
        if i == 0 and cfg.max_rotation > 0:
            angle = estimate_rotation(a, b, cfg.max_rotation)
            if abs(angle) >= np.deg2rad(MIN_ROTATION_DEGREES):
                yield _refine(a, b, coarse, cfg, angle)


# ---------------------------------------------------------------- comparison


@dataclasses.dataclass(frozen=True)
class Match:
    disagreement: float  # worst-window unexplained edge strength (0 = same picture)
    overlap: float  # share of the smaller image covered by the aligned overlap
    scale: float
    peak: float

    def accepted(self, cfg: VerifyConfig) -> bool:
        return self.overlap >= cfg.min_overlap and self.disagreement <= cfg.max_disagreement


NO_MATCH = Match(disagreement=float("inf"), overlap=0.0, scale=float("nan"), peak=0.0)


def _warp(src: np.ndarray, mat: np.ndarray, t: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sample the map ``src`` (H x W) at ``mat @ x + t`` on a grid of ``shape``, antialiased when
    shrinking, and the mask of grid points that fall inside ``src``."""
    ndi = _ndi()
    shrink = float(np.sqrt(abs(np.linalg.det(mat))))
    if shrink > 1.0:
        src = ndi.gaussian_filter(src, 0.5 * np.sqrt(shrink * shrink - 1.0))
    out = ndi.affine_transform(src, mat, offset=t, output_shape=shape, order=1, mode="nearest")
    if mat[0, 1] == 0 and mat[1, 0] == 0:  # no rotation: the valid region is a rectangle
        ys = mat[0, 0] * np.arange(shape[0]) + t[0]
        xs = mat[1, 1] * np.arange(shape[1]) + t[1]
        valid = ((ys >= 0) & (ys <= src.shape[0] - 1))[:, None] & ((xs >= 0) & (xs <= src.shape[1] - 1))[None, :]
    else:
        grid = np.mgrid[0:shape[0], 0:shape[1]].reshape(2, -1).astype(np.float64)
        ys, xs = mat @ grid + np.asarray(t, np.float64)[:, None]
        valid = ((ys >= 0) & (ys <= src.shape[0] - 1) & (xs >= 0) & (xs <= src.shape[1] - 1)).reshape(shape)
    return out, valid


def _warped_edges(src: Prepared, mat: np.ndarray, t: np.ndarray, shape: tuple[int, int]):
    """Edge strength of ``src`` resampled onto another grid. Shrinking by more than
    ``EDGE_WARP_MAX`` resamples the pixels and computes edges there: fine texture that the
    shrink blurs away must not survive as edge energy, as it would in a shrunk edge map."""
    if np.sqrt(abs(np.linalg.det(mat))) <= EDGE_WARP_MAX:
        return _warp(src.edges, mat, t, shape)
    rgb = src.rgb.astype(np.float32) / 255.0
    chans = [_warp(rgb[..., c], mat, t, shape) for c in range(3)]
    return edge_strength(np.stack([c[0] for c in chans], -1)), chans[0][1]


def _frames(a: Prepared, b: Prepared, al: Alignment):
    """Both edge maps on the grid of the lower-resolution image, and the overlap mask."""
    mat, t = al.matrix(), np.array([al.ty, al.tx])
    if al.scale >= 1.0:  # B has fewer pixels per unit of content: resample A onto B's grid
        wa, valid = _warped_edges(a, mat, t, b.shape)
        return wa, b.edges, valid
    inv = np.linalg.inv(mat)
    wb, valid = _warped_edges(b, inv, -inv @ t, a.shape)
    return a.edges, wb, valid


def compare(a: Prepared, b: Prepared, al: Alignment, cfg: VerifyConfig | None = None) -> Match:
    """Disagreement of A and B under one alignment (see the module docstring)."""
    cfg = cfg or VerifyConfig()
    ndi = _ndi()
    ea, eb, valid = _frames(a, b, al)
    mask = ndi.binary_erosion(valid, iterations=OVERLAP_ERODE)
    # The overlap as a share of the smaller image, both measured on the frame's grid.
    frame_px = valid.size
    area_a = a.shape[0] * a.shape[1] / (al.scale * al.scale) if al.scale >= 1 else a.shape[0] * a.shape[1]
    area_b = b.shape[0] * b.shape[1] if al.scale >= 1 else b.shape[0] * b.shape[1] * al.scale * al.scale
    overlap = float(valid.sum() / max(min(area_a, area_b, frame_px), 1.0))
    n = int(mask.sum())
    if n < 64:
        return Match(float("inf"), overlap, al.scale, al.peak)
    ea = np.minimum(ea / (np.percentile(ea[mask], EDGE_PERCENTILE) + 1e-3), 1.5)
    eb = np.minimum(eb / (np.percentile(eb[mask], EDGE_PERCENTILE) + 1e-3), 1.5)
    size = 2 * cfg.radius + 1
    unexplained = np.maximum(np.maximum(ea - EXPLAIN_RATIO * ndi.maximum_filter(eb, size=size), 0.0),
                             np.maximum(eb - EXPLAIN_RATIO * ndi.maximum_filter(ea, size=size), 0.0))
    unexplained *= mask
    window = max(MIN_WINDOW, int(round(max(mask.shape) * WINDOW_FRACTION)))
    num = ndi.uniform_filter(unexplained, window, mode="constant")
    den = ndi.uniform_filter(mask.astype(np.float32), window, mode="constant")
    inside = den >= 0.5
    worst = float((num[inside] / den[inside]).max()) if inside.any() else float("inf")
    return Match(worst, overlap, al.scale, al.peak)


def match_images(a: Prepared, b: Prepared, cfg: VerifyConfig | None = None, *, exhaustive: bool = False) -> Match:
    """The lowest-disagreement match over the candidate alignments with enough overlap. Stops at
    the first accepted one unless ``exhaustive`` (calibration wants the true minimum)."""
    cfg = cfg or VerifyConfig()
    best = NO_MATCH
    for al in iter_alignments(a, b, cfg):
        m = compare(a, b, al, cfg)
        if m.overlap >= cfg.min_overlap and m.disagreement < best.disagreement:
            best = m
            if not exhaustive and best.accepted(cfg):
                break
    return best


# ---------------------------------------------------------------- pairs
