"""Shared fixtures. Tests run offline: the hub is off and sockets are blocked."""
import os
import socket
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _NoNetwork(socket.socket):
    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")) or not isinstance(address, tuple):
            return super().connect(address)
        raise OSError(f"network access blocked in tests: {address}")


socket.socket = _NoNetwork


@pytest.fixture(scope="session")
def tiny():
    from training.models import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory, tiny):
    """`tiny` written as a single-file ldm checkpoint (fp32)."""
    import torch

    from training.models import save_single_file

    return save_single_file(tiny, tmp_path_factory.mktemp("tiny") / "tiny.safetensors", dtype=torch.float32)


@pytest.fixture(scope="session")
def sd15_file(tmp_path_factory):
    """A random-weight checkpoint with the exact full-size SD1.5 layout (fp16, ~2 GB)."""
    import torch

    from training.models import build_random, save_single_file

    model = build_random("sd15", seed=1, dtype=torch.float16)
    return save_single_file(model, tmp_path_factory.mktemp("sd15") / "sd15_random.safetensors")
