import os

# The suite never touches the network: set before huggingface_hub and diffusers read their constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_pipe():
    from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline

    pipe = make_tiny_pixelhdm_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
