"""Test settings every test relies on: one torch thread, no hub, no analytics.

One thread matters: with another process busy on one core, torch's spinning OpenMP
threads made a 64 px step 60x slower on the 2-core CI machine.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """accelerate keeps a process-wide singleton; a test must not inherit another's."""
    yield
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:
        pass


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny SD 1.5 and SDXL pipelines and three subject images, built once per test session."""
    from tests.training_helpers import make_tiny_assets

    return make_tiny_assets(tmp_path_factory.mktemp("tiny"))
