"""The house rules of the product's layout: stages import one way, nothing private crosses a module,
no product module passes 500 lines (scripts/import_graph.py draws the graph)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import import_graph  # noqa: E402

MAX_MODULE_LINES = 500


def test_no_stage_or_module_cycle_and_no_private_import():
    stage_edges, stage_cycles, private, module_cycles = import_graph.analyse()
    assert stage_cycles == [] and module_cycles == [] and private == []
    # The flow the folders show: the store below the ANN index, both below the jobs and the server.
    assert "index.ann" not in stage_edges["index.store"]
    assert not {"index.jobs", "serve", "train"} & stage_edges["index.ann"]
    assert not {"index.store", "index.ann", "index.jobs", "serve", "train"} & stage_edges["embed"]
    assert stage_edges["imgsearch"] == set()  # shared basics import no stage


def test_a_new_cycle_is_found(tmp_path):
    edges = {"embed": {"index.store"}, "index.store": {"embed"}, "serve": {"embed"}}
    assert import_graph.cycles(edges) == [["embed", "index.store"]]


@pytest.mark.parametrize("package", import_graph.PACKAGES)
def test_product_modules_stay_small(package):
    long = {str(p.relative_to(REPO)): n for p in (REPO / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_script_exits_zero_and_prints_the_graph():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "import_graph.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert "index.jobs" in out.stdout and "no cycles, no private imports" in out.stdout
