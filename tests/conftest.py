import os
import signal

import pytest
import torch

# Tests never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# The Ctrl-C tests send SIGINT to this process and to the commands it starts. A suite started in the background by
# a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and so would every child: give the process
# Python's own handler, which its children then start with (an ignored signal stays ignored across exec, a handled
# one does not).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
