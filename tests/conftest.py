import os

import pytest
import torch

# keep test runs off the user's cache and deterministic on 2 cores
os.environ.setdefault("TREEFFN_CACHE", os.path.join(os.path.dirname(__file__), "..", ".venv", "treeffn-test-cache"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The committed text sample, prepared once per test session (vocab 512)."""
    from treeffn.data import prepare_sample

    out = tmp_path_factory.mktemp("sample") / "data"
    prepare_sample(out, vocab_size=512)
    return out
