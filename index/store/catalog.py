"""Reading a catalog file (CSV or JSON Lines): rows, or rejects with their line numbers."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgsearch.errors import BadInput

log = logging.getLogger(__name__)

REJECTS_FILE = "rejects.jsonl"
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
REQUIRED_COLUMNS = ("product_id", "image")


@dataclasses.dataclass(frozen=True)
class CatalogRow:
    line: int  # 1-based line of the file where the row starts
    product_id: str
    image: str
    category: str | None
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Reject:
    line: int
    product_id: str | None
    image: str | None
    reason: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


# ---------------------------------------------------------------- reading


def read_catalog(path: str | os.PathLike) -> Iterator[CatalogRow | Reject]:
    """Stream the rows of a catalog file, good ones as :class:`CatalogRow`, bad ones as :class:`Reject`.

    Line numbers: CSV data rows start at line 2 (after the header), JSON Lines at line 1.
    Raises :class:`BadInput` for a catalog that cannot be read at all (missing file,
    unknown suffix, CSV header without the required columns).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"catalog {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    raise BadInput(f"catalog {str(path)!r} has suffix {suffix!r}; expected one of {', '.join(CSV_SUFFIXES + JSONL_SUFFIXES)}")


def _read_csv(path: Path) -> Iterator[CatalogRow | Reject]:
    # surrogateescape: a bad byte rejects its row instead of aborting the whole file.
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        header = _read_csv_header(reader, path)
        end_of_previous = reader.line_num
        try:
            for cells in reader:
                line, end_of_previous = end_of_previous + 1, reader.line_num
                if not cells:  # blank line
                    continue
                if len(cells) > len(header):
                    yield Reject(line, None, None, f"row has {len(cells)} fields, the header has {len(header)}")
                    continue
                yield _row_from_fields(line, dict(zip(header, cells)))
        except csv.Error as exc:
            raise BadInput(f"catalog {str(path)!r} line {reader.line_num}: malformed CSV ({exc})") from None


def _read_csv_header(reader, path: Path) -> list[str]:
    for cells in reader:
        if cells:
            header = [name.strip() for name in cells]
            missing = [name for name in REQUIRED_COLUMNS if name not in header]
            if missing:
                raise BadInput(f"catalog {str(path)!r} header {header!r} lacks required column(s) {missing!r}")
            return header
    raise BadInput(f"catalog {str(path)!r} is empty (no header row)")


def _read_jsonl(path: Path) -> Iterator[CatalogRow | Reject]:
    with path.open("rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield Reject(line, None, None, f"not valid UTF-8: {exc}")
                continue
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Reject(line, None, None, f"invalid JSON: {exc}")
                continue
            if not isinstance(fields, dict):
                yield Reject(line, None, None, f"not a JSON object: {text.strip()[:80]!r}")
                continue
            yield _row_from_fields(line, fields)


def _row_from_fields(line: int, fields: dict[str, Any]) -> CatalogRow | Reject:
    product_id = _as_text(fields.get("product_id"))
    image = _as_text(fields.get("image"))
    if _has_bad_bytes(fields):
        return Reject(line, product_id, image, "not valid UTF-8")
    if product_id is None or not product_id.strip():
        return Reject(line, product_id, image, f"empty product_id: {fields.get('product_id')!r}")
    if image is None or not image.strip():
        return Reject(line, product_id, image, f"empty image path: {fields.get('image')!r}")
    category = fields.get("category")
    category = None if category is None or category == "" else str(category)
    metadata = {key: value for key, value in fields.items() if key not in ("product_id", "image", "category")}
    return CatalogRow(line, product_id, image, category, metadata)


def _as_text(value: Any) -> str | None:
    """Strings as they are; integers (JSON ids written as numbers) as their decimal text."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _has_bad_bytes(fields: dict[str, Any]) -> bool:
    texts = [key for key in fields if isinstance(key, str)] + [value for value in fields.values() if isinstance(value, str)]
    return any(_is_surrogate_escaped(text) for text in texts)


def _is_surrogate_escaped(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
