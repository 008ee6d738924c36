"""Progress of long jobs: a tqdm bar on a terminal, timed plain lines anywhere else (cron)."""

import io
import json
import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from imgsearch.errors import BadInput
from imgsearch.progress import INTERVAL_ENV, Progress, format_duration
from index.store.ingest import count_catalog_rows


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_carry_count_total_rate_and_eta_then_a_final_line():
    out = io.StringIO()
    bar = Progress(5000, "embed catalog.csv", "rows", stream=out, interval=0)
    bar.set_postfix(embedded=3, rejected=1)
    bar.update(1200)
    bar.close()
    bar.close()  # idempotent: one final line
    bar.update(10)  # after close: nothing
    first, final = out.getvalue().splitlines()
    assert re.fullmatch(r"embed catalog\.csv: 1,200/5,000 rows \(24%\), [\d,.]+ rows/s, ETA \S+; embedded 3, rejected 1",
                        first), first
    assert final.startswith("embed catalog.csv: 1,200/5,000 rows (24%), ") and ", elapsed 0s" in final


def test_lines_come_at_the_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0.2")
    out = io.StringIO()
    bar = Progress(10, "build", "vectors", stream=out)
    bar.update(1)
    bar.update(1)
    assert out.getvalue() == ""  # under 0.2 s: no line yet
    time.sleep(0.25)
    bar.update(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("build: 3/10 vectors (30%), ")
    bar.update(7)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("build: 10/10 vectors (100%), ")


def test_unknown_total_gives_counts_and_rate_without_eta():
    out = io.StringIO()
    with Progress(None, "cache views", "images", stream=out, interval=0) as bar:
        bar.update(2)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("cache views: 2 images, ") and "ETA" not in lines[0] and len(lines) == 2


def test_disabled_writes_nothing_even_on_a_terminal():
    for out in (io.StringIO(), _Terminal()):
        with Progress(3, "dedup", stream=out, interval=0, enabled=False) as bar:
            bar.update(3)
        assert out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_with_total_and_eta():
    out = _Terminal()
    bar = Progress(10, "dedup", "vectors", stream=out, interval=0)
    bar.update(3)
    bar.bar.refresh()
    text = out.getvalue()
    bar.close()
    assert "dedup:" in text and "3/10" in text and "<" in text  # tqdm's [elapsed<remaining]
    assert "vectors/s" in out.getvalue() or "s/vectors" in out.getvalue()


def test_lines_go_through_logging_when_it_is_set_up(caplog):
    with caplog.at_level(logging.INFO, logger="imgsearch.progress"):
        with Progress(4, "verify", "pairs", interval=0) as bar:
            bar.update(4)
    records = [r for r in caplog.records if r.name == "imgsearch.progress"]
    assert records[0].getMessage().startswith("verify: 4/4 pairs (100%)")
    assert records[0].fields == {"progress": "verify", "done": 4, "total": 4, "unit": "pairs"}


@pytest.mark.parametrize("raw", ["soon", "-1", "nan"])
def test_a_bad_interval_is_one_clear_error(monkeypatch, raw):
    monkeypatch.setenv(INTERVAL_ENV, raw)
    with pytest.raises(BadInput, match=INTERVAL_ENV):
        Progress(1, "x")


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 48, 108, 7380)] == ["0s", "48s", "1m48s", "2h03m"]


def test_catalog_rows_are_counted_as_read_catalog_yields_them(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('product_id,image\n\np1,a.jpg\np2,"b\nc.jpg"\n\np3,d.jpg,extra\n')
    assert count_catalog_rows(csv_path) == 3  # blank lines skipped, a quoted newline is one row
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"product_id": "p1", "image": "a.jpg"}\n\nnot json\n')
    assert count_catalog_rows(jsonl) == 2
    assert count_catalog_rows(tmp_path / "missing.csv") is None


# ---------------------------------------------------------------- the real commands, off a terminal

def _progress_messages(stderr: str) -> list[str]:
    """Messages of the ``imgsearch.progress`` logger from a JSON-log stderr (a pipe)."""
    messages = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "imgsearch.progress":
                messages.append(entry["message"])
    return messages


def _run(*args: str, interval: str = "0.1") -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", INTERVAL_ENV: interval}
    done = subprocess.run([sys.executable, "-m", "imgsearch", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_embed_and_build_print_progress_lines_when_stderr_is_a_pipe(tmp_path):
    from skimage import data

    # 48 distinct real photos (8 crops of 6): enough rows that lines come on the way at 0.1 s.
    names = []
    for name in ("coffee", "chelsea", "astronaut", "rocket", "camera", "horse"):
        photo = Image.fromarray(getattr(data, name)()).convert("RGB").resize((192, 192))
        for i in range(8):
            names.append(f"{name}-{i}")
            photo.crop((8 * i, 4 * i, 96 + 8 * i, 96 + 4 * i)).save(tmp_path / f"{names[-1]}.jpg")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image\n" + "".join(f"p-{n},{n}.jpg\n" for n in names))
    store, root = tmp_path / "store", tmp_path / "index"

    embed = _progress_messages(_run("embed", str(catalog), "--store", str(store), "--batch-size", "1").stderr)
    counts = [int(m.group(1)) for m in (re.match(r"embed catalog\.csv: (\d+)/48 rows \(\d+%\), ", s) for s in embed) if m]
    assert len(counts) == len(embed) >= 2, embed  # at least one line on the way, and the final one
    assert counts == sorted(counts) and counts[-1] == 48 and "ETA" in embed[0] and "elapsed" in embed[-1]

    build = _progress_messages(_run("build", "--store", str(store), "--index-root", str(root)).stderr)
    assert build and build[-1].startswith("build shard 1/1: 48/48 vectors (100%), "), build

    # Three blocks of vectors, a line at every block (interval 0): the count so far against the total.
    n = 3 * 65536
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((n, 4), dtype=np.float32))
    build = _progress_messages(_run("build", "--vectors", str(tmp_path / "x.npy"), "--factory", "Flat",
                                    "--index-root", str(tmp_path / "raw"), interval="0").stderr)
    done = [int(m.group(1).replace(",", "")) for m in (re.match(r"build shard 1/1: ([\d,]+)/196,608 vectors", s)
                                                        for s in build) if m]
    assert done == [65536, 131072, n, n], build  # one line per block, then the final one
