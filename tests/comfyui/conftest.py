"""Runs the real ComfyUI server with this pack in its custom_nodes/ (fixture `comfy_server`).

The host is found at $COMFYUI_PATH, else ~/ComfyUI; its python at $COMFYUI_PYTHON, else
<host>/.venv/bin/python, else this python. Without a host every test here is skipped
with one printed line. The server gets a temp base directory (models, input, output,
user, custom_nodes, database), so nothing is written into the user's ComfyUI folders; the
host still reads its own extra_model_paths.yaml if it has one.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PACK_NAME = "comfyui-dreambooth-subject"
REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STARTUP_TIMEOUT_S = 180


def find_host() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()


def find_host_python(host: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv_python = host / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def missing_host_reason() -> str | None:
    """Why the host cannot run here, or None when it can."""
    host = find_host()
    if not (host / "main.py").is_file():
        return f"no ComfyUI at {host} (set COMFYUI_PATH)"
    python = find_host_python(host)
    if not Path(python).exists():
        return f"no python at {python} (set COMFYUI_PYTHON)"
    return None


@pytest.hookimpl(tryfirst=True)  # the marks must be there when xdist's own hook reads them
def pytest_collection_modifyitems(config, items):
    reason = missing_host_reason()
    ours = [item for item in items if HERE in Path(item.path).parents]
    for item in ours:  # `--dist loadgroup`: a module runs on one worker, so its module fixtures are made once
        item.add_marker(pytest.mark.xdist_group(f"comfyui_{Path(item.path).stem}"))
    if reason is None or not ours:
        return
    line = f"tests/comfyui skipped: {reason}"
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(line)
    else:
        print(line)
    for item in ours:
        item.add_marker(pytest.mark.skip(reason=reason))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_supports(host: Path, flag: str) -> bool:
    return flag in (host / "comfy" / "cli_args.py").read_text()


def directory_args(host: Path, base: Path, own: Path | None = None) -> list[str]:
    """Point every folder the server reads or writes at `base`; its database and temp folder at `own` when
    another server uses `base` too (a starting host empties its temp folder)."""
    args = []
    if host_supports(host, "--database-url"):  # its default lies inside the host folder
        args += ["--database-url", f"sqlite:///{(own or base / 'user') / 'comfyui.db'}"]
    if own:
        args += ["--temp-directory", str(own)]
    if host_supports(host, "--base-directory"):
        return args + ["--base-directory", str(base)]
    # Older hosts: extra model paths (custom_nodes included) plus one flag per folder.
    extra = base / "extra_model_paths.yaml"
    extra.write_text(
        f"pytest:\n  base_path: {base}\n  checkpoints: models/checkpoints\n"
        "  loras: models/loras\n  custom_nodes: custom_nodes\n"
    )
    args += ["--extra-model-paths-config", str(extra), "--output-directory", str(base / "output"),
             "--input-directory", str(base / "input")] + ([] if own else ["--temp-directory", str(base)])
    if host_supports(host, "--user-directory"):
        args += ["--user-directory", str(base / "user")]
    return args


def backoff(seconds: float, first: float = 0.01, longest: float = 0.2):
    """Pauses between polls for `seconds`: short at first (most prompts of the bad-input matrix end in
    ~20 ms, and a fixed 0.5 s pause idled a core for most of each case), then at most `longest` (a poll
    costs the server ~1 ms). Ends once the time is up."""
    deadline, pause = time.monotonic() + seconds, first
    while time.monotonic() < deadline:
        yield pause
        pause = min(longest, pause * 1.5)


class ComfyServer:
    """A running ComfyUI server and small HTTP helpers around it."""

    def __init__(self, host: Path, python: str, base_dir: Path, log_path: Path, listen: str = "127.0.0.1",
                 build_cache: Path | None = None, own_dir: Path | None = None):
        self.host, self.python, self.base_dir, self.log_path = host, python, base_dir, log_path
        self.own_dir = own_dir  # database and temp folder, for a server on another server's base_dir
        self.build_cache = build_cache  # where host_helpers builds the test checkpoint once per run
        self.listen = listen  # e.g. "0.0.0.0": a server others can reach (requests still go to 127.0.0.1)
        self.pack_dir = base_dir / "custom_nodes" / PACK_NAME
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = None

    def start(self) -> None:
        port = self.url.rsplit(":", 1)[1]
        command = [self.python, "main.py", "--cpu", "--disable-api-nodes",
                   "--listen", self.listen, "--port", port,
                   *directory_args(self.host, self.base_dir, self.own_dir)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.host, env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        for pause in backoff(STARTUP_TIMEOUT_S):
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(pause)
        pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        from host_helpers import stop_process

        stop_process(self.process, timeout=20)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def post_prompt(self, api_prompt: dict) -> str:
        """Queue an API-format prompt; a validation error fails with the server's answer."""
        body = json.dumps({"prompt": api_prompt, "client_id": "pytest"}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)["prompt_id"]
        except urllib.error.HTTPError as error:
            pytest.fail(f"/prompt refused the prompt ({error.code}): {error.read().decode()}")

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The /history entry of a finished prompt: its "status" and "outputs"."""
        for pause in backoff(timeout):
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # an entry appears only once the prompt is done
                return history[prompt_id]
            time.sleep(pause)
        pytest.fail(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail()}")


def new_server(root: Path, listen: str = "127.0.0.1", base_dir: Path | None = None,
               build_cache: Path | None = None) -> ComfyServer:
    """A server (not started) with its own base directory under `root`, or on `base_dir` (e.g. another
    server's, running or not: then its database and temp folder are in `root`); its log is root/comfyui.log."""
    reason = missing_host_reason()
    if reason:
        pytest.skip(reason)
    host = find_host()
    if base_dir is None:
        base_dir = root / "base"
        # models/embeddings as a real install has it (pivotal training writes its embedding file there)
        for folder in ["models/checkpoints", "models/loras", "models/embeddings", "input", "output", "user",
                       "custom_nodes"]:
            (base_dir / folder).mkdir(parents=True)
        (base_dir / "custom_nodes" / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
        # a test-only node that saves a CONDITIONING (test_pivotal_host.py reads encodings with it)
        shutil.copy2(HERE / "save_conditioning.py", base_dir / "custom_nodes" / "save_conditioning.py")
        own_dir = None
    else:
        own_dir = root
    return ComfyServer(host, find_host_python(host), base_dir, root / "comfyui.log", listen=listen,
                       build_cache=build_cache, own_dir=own_dir)


def run_folder(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run shares: the parent of the workers' popen-gwN basetemps."""
    basetemp = tmp_path_factory.getbasetemp()
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One server per worker; the host test modules that need no server of their own all run on it."""
    server = new_server(tmp_path_factory.mktemp("comfyui"), build_cache=run_folder(tmp_path_factory))
    try:
        server.start()
        yield server
    finally:
        server.stop()
