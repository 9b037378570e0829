import os

import pytest
import torch

# Tests never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ovdense_cache"))


@pytest.fixture(autouse=True)
def _isolated_cache(_session_cache, monkeypatch):
    # One cache for the session, never the user's: the tiny models' text embeddings are deterministic,
    # so tests share them; tests of the cache itself use their own folders.
    monkeypatch.setenv("OVDENSE_CACHE", _session_cache)


@pytest.fixture(scope="session")
def tiny_vit():
    from ovdense.weights import load_model

    return load_model("ovdense-test-vit")


@pytest.fixture(scope="session")
def tiny_eva():
    from ovdense.weights import load_model

    return load_model("ovdense-test-eva02")
