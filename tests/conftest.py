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



@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The bundled subject photos prepared at 64 px (tiny's size), once per session; read-only for tests."""
    from fixture_paths import SUBJECT_PHOTOS
    from training.data import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("tiny_dataset")
    prepare_dataset(SUBJECT_PHOTOS, out, PrepareConfig(resolution=64))
    return out

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2`: each worker (and each CLI it starts) uses one thread, so two workers share two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


# Modules whose module fixtures are expensive (a training run, a CLI reference run, dlib's detections, the
# 2 GB full-size file, the tiny CLIP/DINO scorers): under `--dist loadgroup` each runs on one worker, so those
# fixtures are made once a run instead of once per worker (tests/comfyui/conftest.py groups the host modules).
SHARED_FIXTURE_MODULES = {"test_cli_train", "test_crash_safety", "test_evaluate", "test_face_descriptor",
                          "test_identity", "test_models"}


@pytest.hookimpl(tryfirst=True)  # the marks must be there when xdist's own hook reads them
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = Path(item.path).stem
        if module in SHARED_FIXTURE_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_xdist_groups(config, items):  # pytest registers only pytest_* names
    """xdist 3.8 tells its scheduler an item's group by renaming item._nodeid to "<id>@<group>"; pytest 9.2 keeps
    the id in item._id and ignores that (pytest-xdist#1386), so every test was scheduled alone. Rename it here,
    after xdist's hook, where xdist's rename did not take (a fixed xdist leaves nothing to do)."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    for item in items:
        groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                         for mark in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            from _pytest.nodeid import NodeId  # pytest 9.2's structured ids; older ones took xdist's rename

            item._id = NodeId.parse(item.nodeid + suffix)


def pytest_sessionstart(session):
    """Under xdist the workers collect, so their `tests/comfyui skipped: ...` line never reaches the
    terminal: the controller says it here instead."""
    config = session.config
    comfyui = ROOT / "tests" / "comfyui"
    chosen = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    if not any(p == comfyui or p in comfyui.parents or comfyui in p.parents for p in chosen):
        return
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        import importlib.util

        spec = importlib.util.spec_from_file_location("comfyui_conftest", ROOT / "tests" / "comfyui" / "conftest.py")
        host = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(host)
        reason = host.missing_host_reason()
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reason is not None and reporter:
            reporter.write_line(f"tests/comfyui skipped: {reason}")
