"""Execute every notebook top to bottom on small settings (nbclient + ipykernel) and count the
figures it shows: the notebooks are plot-first, so a notebook that runs but displays no picture
(a non-interactive matplotlib backend, a plot that was dropped) fails."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

import lampe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NB_DIR = os.path.join(os.path.dirname(HERE), "notebooks")

# name -> figures it must display: one per plotting cell of tools/make_notebooks.py
FIGURES = {
    "01_positions_and_regions.ipynb": 4,   # mapped ids, region map, relative positions, mapping length U(L)
    "02_passkey_and_perplexity.ipynb": 2,  # passkey accuracy, perplexity
    "03_performance.ipynb": 1,             # throughput against length
}


def test_every_notebook_is_checked():
    assert sorted(FIGURES) == sorted(n for n in os.listdir(NB_DIR) if n.endswith(".ipynb"))


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_shows_its_figures(name, monkeypatch):
    if name.startswith("02"):
        pytest.importorskip("torch")
    path = os.path.join(NB_DIR, name)
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed with outputs"
    env_path = os.path.dirname(os.path.dirname(os.path.abspath(lampe.__file__)))
    # the kernel must import the same lampe as this process (an installed one, or a build in place)
    monkeypatch.setenv("PYTHONPATH", env_path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # a backend chosen by the environment (CI machines often set Agg) must not hide the figures
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NB_DIR}})
    client.execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == FIGURES[name], f"{name} displayed {len(images)} figure(s), expected {FIGURES[name]}"
