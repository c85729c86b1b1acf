"""colab/sfbd_demo.ipynb runs top to bottom (with configs/sfbd_smoke.py instead of the demo)
and shows its metrics and pictures."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colab", "sfbd_demo.ipynb")


@pytest.mark.slow
def test_demo_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert 'CONFIG = "configs/demo.py"' in params.source  # the demo is what users run
    params.source = (f'CONFIG = "configs/sfbd_smoke.py"\nWORKDIR = "{tmp_path / "run"}"\n'
                     "OVERRIDES = {'sfbd.rounds': 1}")
    env_before = os.environ.pop("XLA_FLAGS", None)  # the kernel chooses its own devices
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": REPO}}).execute()
    finally:
        if env_before is not None:
            os.environ["XLA_FLAGS"] = env_before
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "finished at step" in text
    assert "round   step train loss  PSNR (dB)" in text
    assert "    1      " in text  # the row of round 1
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 3  # PSNR curve, sample grids per round, noisy/denoised/clean
    assert (tmp_path / "run" / "samples" / "round1.png").exists()
