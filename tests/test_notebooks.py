"""Execute every notebook top to bottom on small settings (nbclient + ipykernel)."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

import lampe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NB_DIR = os.path.join(os.path.dirname(HERE), "notebooks")


@pytest.mark.parametrize("name", ["01_positions_and_regions.ipynb", "02_passkey_and_perplexity.ipynb",
                                  "03_performance.ipynb"])
def test_notebook_runs(name, monkeypatch):
    if name.startswith("02"):
        pytest.importorskip("torch")
    path = os.path.join(NB_DIR, name)
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed with outputs"
    env_path = os.path.dirname(os.path.dirname(os.path.abspath(lampe.__file__)))
    # the kernel must import the same lampe as this process (an installed one, or a build in place)
    monkeypatch.setenv("PYTHONPATH", env_path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NB_DIR}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
