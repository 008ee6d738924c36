"""Integrity of a version's files: recorded at build, checked cheaply at open, fully by ``imgsearch verify``.

``manifest["files"]`` maps every data file of the version to ``{"bytes": int, "sha256": hex}``:
``trained.faiss`` and, per shard, its ``.faiss``, ``.ids.i64``, ``.sorted.i64``, ``.order.i64``
and ``.rerank.f16``. Files written after publish (``rebuild.json``, ``tombstones.npy``) and the
manifest itself are not listed.

At open (:func:`check_at_open`, raising :class:`~index.ann.versions.BadIndex`):
- every file has its recorded size, and the sizes agree with the shard counts (8 B per id,
  2 x dim B per re-rank row); the shard counts add up to the manifest's ``ntotal``;
- on a random sample of rows, ``sorted_ids[j] == ids[order[j]]`` and ``sorted_ids`` increases
  (a shuffled or zeroed id map fails this even without checksums);
- files are hashed, id maps first then smallest first, while the bytes hashed stay within
  ``OPEN_HASH_BYTES``. sha256 runs at ~1.7 GB/s here, so 256 MiB costs ~0.15 s (measured: the
  three id maps of 8M vectors, 192 MB, checked in 0.135 s): all of a version up to a few million
  vectors, and the id maps (24 B per vector) up to ~10 million.
  Larger files get only the size and structure checks at open; ``verify`` hashes everything.
A version built before checksums were recorded opens with a logged warning (structure checks only).
The faiss header (readable, ``ntotal``, ``d``) is checked where the part is read (:mod:`index.ann.parts`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import numpy as np

from index.ann import versions

log = logging.getLogger(__name__)

FILES = "files"
OPEN_HASH_BYTES = 256 << 20
SAMPLE_ROWS = 1024
BLOCK = 1 << 20
_ID_MAPS = ("ids", "sorted_ids", "order")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def data_files(manifest: dict, shards: list[dict] | None = None) -> list[str]:
    """The data files of a version (or of the given shard entries, plus the trained index)."""
    names = [manifest["trained_index"]] if manifest.get("trained_index") else []
    for s in manifest["shard_files"] if shards is None else shards:
        names += [s[key] for key in ("index", *_ID_MAPS, "rerank") if s.get(key)]
    return names


def record_files(vdir: str, manifest: dict) -> dict:
    """``manifest["files"]`` for a finished (staged) version."""
    out = {}
    for name in data_files(manifest):
        path = os.path.join(vdir, name)
        out[name] = {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    return out


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _lookup_problems(vdir: str, shard: dict, n: int, full: bool) -> list[str]:
    """ids / sorted_ids / order agree: on a random sample of rows, or (``full``) on all of them."""
    if n == 0:
        return []
    ids, sorted_ids, order = (np.memmap(os.path.join(vdir, shard[k]), dtype=np.int64, mode="r", shape=(n,))
                              for k in _ID_MAPS)
    if full:
        chunks = (np.arange(lo, min(lo + BLOCK, n)) for lo in range(0, n, BLOCK))
    else:
        chunks = [np.unique(np.random.default_rng().integers(0, n, min(SAMPLE_ROWS, n)))]
    checked = bad_rows = unsorted = 0
    for j in chunks:
        rows = np.asarray(order[j])
        inside = (rows >= 0) & (rows < n)
        got = np.full(j.shape, -1, np.int64)
        got[inside] = np.asarray(ids[rows[inside]])
        want = np.asarray(sorted_ids[j])
        bad_rows += int(np.count_nonzero(~inside | (got != want)))
        nxt = j[j < n - 1]
        unsorted += int(np.count_nonzero(np.asarray(sorted_ids[nxt]) >= np.asarray(sorted_ids[nxt + 1])))
        checked += j.size
    problems = []
    if bad_rows:
        problems.append(f"{shard['ids']}, {shard['sorted_ids']} and {shard['order']} disagree: "
                        f"sorted_ids[j] != ids[order[j]] at {bad_rows} of {checked} rows checked")
    if unsorted:
        problems.append(f"{shard['sorted_ids']} is not strictly increasing at {unsorted} of {checked} rows checked")
    return problems


def structure_problems(vdir: str, manifest: dict, shards: list[dict], *, whole: bool, full: bool) -> list[str]:
    """Counts and sizes the manifest implies, and the id maps' consistency. Cheap unless ``full``."""
    try:
        dim = int(manifest["dim"])
        problems = []
        if whole:
            counts = [int(s["ntotal"]) for s in manifest["shard_files"]]
            if int(manifest["ntotal"]) != sum(counts):
                problems.append(f"manifest ntotal {manifest['ntotal']} != {sum(counts)}, the sum of its shard files' ntotal")
            if int(manifest.get("shards") or len(counts)) != len(counts):
                problems.append(f"manifest shards {manifest['shards']} != its {len(counts)} shard file(s)")
        for s in shards:
            n = int(s["ntotal"])
            want = {s[k]: 8 * n for k in _ID_MAPS}
            if s.get("rerank"):
                want[s["rerank"]] = 2 * dim * n
            sizes_ok = _size(os.path.join(vdir, s["index"])) is not None
            if not sizes_ok:
                problems.append(f"{s['index']} is missing")
            for name, size in want.items():
                got = _size(os.path.join(vdir, name))
                if got != size:
                    sizes_ok = False
                    problems.append(f"{name} is missing" if got is None else
                                    f"{name} has {got} bytes, {size} expected for ntotal {n}")
            if sizes_ok:
                problems += _lookup_problems(vdir, s, n, full)
        return problems
    except (KeyError, TypeError, ValueError) as exc:
        return [f"{versions.MANIFEST} is malformed: {type(exc).__name__}: {exc}"]


def _recorded(manifest: dict) -> dict | None:
    files = manifest.get(FILES)
    return files if isinstance(files, dict) or files is None else {}


def _file_problems(vdir: str, recorded: dict, names: list[str], hash_budget: int | None) -> list[str]:
    """Recorded sizes, then sha256 of the files that fit ``hash_budget`` (None: all of them)."""
    problems, to_hash = [], []
    for name in names:
        entry = recorded.get(name)
        got = _size(os.path.join(vdir, name))
        if not isinstance(entry, dict) or "bytes" not in entry or "sha256" not in entry:
            problems.append(f"{name} has no checksum in {versions.MANIFEST}")
        elif got is None:
            problems.append(f"{name} is missing")
        elif got != entry["bytes"]:
            problems.append(f"{name} has {got} bytes, the manifest recorded {entry['bytes']}")
        else:
            to_hash.append((name, got))
    to_hash.sort(key=lambda f: (not any(f[0].endswith(e) for e in (".ids.i64", ".sorted.i64", ".order.i64")), f[1]))
    left = hash_budget
    for name, size in to_hash:
        if left is not None:
            if size > left:
                continue
            left -= size
        if sha256_of(os.path.join(vdir, name)) != recorded[name]["sha256"]:
            problems.append(f"{name}: sha256 differs from the one recorded at build (the file changed)")
    return problems


def check_at_open(vdir: str, manifest: dict, shards: list[dict], *, whole: bool) -> None:
    """The cheap checks for opening ``shards`` of a version (``whole``: all of it); raises BadIndex."""
    name = manifest.get("version", os.path.basename(vdir))
    recorded = _recorded(manifest)
    problems = structure_problems(vdir, manifest, shards, whole=whole, full=False)
    if recorded is None:
        log.warning("index version %s has no checksums (built before they were recorded): opening it with "
                    "structure checks only; rebuild it to get them", name)
    elif not problems:
        problems = _file_problems(vdir, recorded, data_files(manifest, shards), OPEN_HASH_BYTES)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise versions.BadIndex(f"index version {name!r} failed its integrity check: {'; '.join(problems[:3])}{more}; "
                                "refusing to open it")


@dataclasses.dataclass
class Report:
    problems: list
    notes: list
    files: int = 0


def verify_version(vdir: str) -> Report:
    """Every check, every byte: what ``imgsearch verify`` prints."""
    try:
        manifest = versions.read_manifest(vdir)
    except versions.NoIndex as exc:
        return Report([str(exc)], [])
    shards = manifest.get("shard_files")
    if not isinstance(shards, list):
        return Report([f"{versions.MANIFEST} has no shard_files list"], [])
    problems = structure_problems(vdir, manifest, shards, whole=True, full=True)
    recorded, notes = _recorded(manifest), []
    try:
        names = data_files(manifest)
    except (KeyError, TypeError) as exc:
        return Report(problems + [f"{versions.MANIFEST} is malformed: {exc}"], [])
    if recorded is None:
        notes.append("no checksums recorded (built before they were); structure checks only")
        bad_files = set()
    else:
        file_problems = _file_problems(vdir, recorded, names, None)
        problems += file_problems
        bad_files = {n for n in names if any(p.startswith(n) for p in file_problems)}
    if not problems:
        problems += _faiss_problems(vdir, manifest, shards, bad_files)
    return Report(problems, notes, len(names))


def _faiss_problems(vdir: str, manifest: dict, shards: list[dict], skip: set) -> list[str]:
    """Each faiss file reads (memory-mapped), with the manifest's ``d`` and each shard's ``ntotal``."""
    import faiss

    problems = []
    dim = int(manifest["dim"])
    wanted = [(s["index"], int(s["ntotal"])) for s in shards]
    if manifest.get("trained_index"):
        wanted.append((manifest["trained_index"], None))
    for name, ntotal in wanted:
        if name in skip:
            continue
        try:
            index = faiss.read_index(os.path.join(vdir, name), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            problems.append(f"{name}: unreadable faiss index: {str(exc).splitlines()[0] if str(exc) else exc}")
            continue
        if index.d != dim:
            problems.append(f"{name} holds {index.d}-d vectors, the manifest says {dim}")
        if ntotal is not None and index.ntotal != ntotal:
            problems.append(f"{name} holds {index.ntotal} vectors, the manifest says {ntotal}")
    return problems
