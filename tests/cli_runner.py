"""`python -m training ARGS` for tests, without paying the imports each time.

`run(argv, cwd=..., env=..., timeout=..., drop_dac=...)` has the contract of
`subprocess.run([sys.executable, "-m", "training", *argv], capture_output=True, text=True, timeout=...)`:
it returns a CompletedProcess (returncode, stdout, stderr) and raises subprocess.TimeoutExpired.
`start(argv, cwd=..., env=..., stdout=..., stderr=..., text=...)` starts one and does not wait, as
`subprocess.Popen([...], stdout=..., stderr=..., text=..., process_group=0)` would: the handle has pid,
returncode, stdout/stderr (pipes where PIPE was asked for), poll(), wait(timeout), communicate(timeout),
send_signal(), terminate() and kill(). The pid is the command's own process (its own process group), so a
signal the test sends reaches the command as it would a fresh interpreter; a run killed by a signal gives
-signum, an uncaught KeyboardInterrupt -SIGINT, as the interpreter does.

One server process per test process is started on first use (`sys.executable`, PYTHONPATH=<repo root>).
It imports training.cli and the heavy libraries but runs no torch op, so no OpenMP thread pool exists
when it forks. For each request it forks a child that takes the request's environment, working folder,
argv and fds 1/2 (temp files for run; for start the test's own pipes or files, passed over a Unix socket),
optionally drops CAP_DAC_OVERRIDE/READ_SEARCH, and runs the `training` package as `__main__` exactly as
`python -m training` does. A fresh interpreter is used instead when
fork is unavailable (not Linux) or when the request changes an environment variable that a library
reads only at import time (HF_*, TORCH*, OMP_*, locale, ...).
A request's PYTHONPATH is taken as the interpreter takes it at startup: new folders on sys.path, and their
sitecustomize.py run (a test's hooks, e.g. tests/test_crash_safety.py's slow or failing saves).

`run_script(script, argv, ...)` does the same for `python SCRIPT *argv` (the benchmarks' smoke modes).

Tests about what a fresh interpreter does (the install test, what an import pulls in) keep real
subprocesses; so do other commands (accelerate launch).
"""
from __future__ import annotations

import atexit
import base64
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# read by a library at import time: a request that changes one of these gets a fresh interpreter
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_",
                   "KMP_", "CUDA_", "ACCELERATE_", "TQDM_", "PYTHON", "LANG", "LC_", "XDG_CACHE_HOME")
# written into os.environ by a library in the test process itself, to the value it uses when unset (torch's
# inductor, on first use: a test module's env captured before that differs from the server's only there)
SELF_SET_ENV = ("TORCHINDUCTOR_CACHE_DIR",)
PRELOAD = ("torch", "numpy", "PIL.Image", "safetensors.torch", "accelerate", "peft", "peft.utils", "transformers",
           "diffusers", "diffusers.optimization", "diffusers.loaders.single_file_utils")
PRELOAD_NAMES = {
    "diffusers": ("UNet2DConditionModel", "AutoencoderKL", "DDPMScheduler", "DDIMScheduler",
                  "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"),
    "transformers": ("CLIPTextModel", "CLIPTextConfig", "CLIPTokenizer", "CLIPModel", "CLIPVisionConfig",
                     "CLIPVisionModelWithProjection"),
    "peft": ("LoraConfig", "inject_adapter_in_model"),
    "accelerate": ("Accelerator",),
}


def without_dac_override() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so `chmod 000` means unreadable to root too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, dropped from the bounding set
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _drop_dac_from_this_process() -> None:
    """without_dac_override, and since no exec follows a fork, the same two bits out of this process's
    effective, permitted and inheritable sets (capset)."""
    without_dac_override()

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & keep)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


# ---------------------------------------------------------------- the test side


def run(argv: list, cwd: Path | str = ROOT, env: dict | None = None, timeout: float | None = None,
        drop_dac: bool = False, text: bool = True) -> subprocess.CompletedProcess:
    """`python -m training *argv` as subprocess.run(..., capture_output=True, text=text) would run it
    (text=False: stdout and stderr as the bytes written, carriage returns kept)."""
    return _run(None, argv, cwd, env, timeout, drop_dac, text)


def run_script(script: Path | str, argv: list, cwd: Path | str = ROOT, env: dict | None = None,
               timeout: float | None = None, text: bool = True) -> subprocess.CompletedProcess:
    """`python SCRIPT *argv` (a benchmark's smoke mode) as subprocess.run(..., capture_output=True, text=text)
    would run it: the script's folder first on sys.path, run as __main__."""
    return _run(str(script), argv, cwd, env, timeout, False, text)


def _command(script: str | None, argv: list, env: dict | None) -> tuple[list[str], dict, list[str]]:
    """(argv as strings, the environment, the command line a fresh interpreter would get)."""
    argv = [str(a) for a in argv]
    return argv, dict(os.environ if env is None else env), [sys.executable, *([script] if script else
                                                                              ["-m", "training"]), *argv]


def _run(script: str | None, argv: list, cwd: Path | str, env: dict | None, timeout: float | None,
         drop_dac: bool, text: bool) -> subprocess.CompletedProcess:
    argv, env, command = _command(script, argv, env)
    drop = drop_dac and hasattr(os, "geteuid") and os.geteuid() == 0
    if not _SERVER.usable(env):
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=text, timeout=timeout,
                              preexec_fn=without_dac_override if drop else None)
    answer = _SERVER.ask({"argv": argv, "script": script, "cwd": str(cwd), "env": env, "drop_dac": drop,
                          "timeout": timeout})
    decode = pipe_text if text else bytes
    stdout, stderr = (decode(base64.b64decode(answer[name])) for name in ("stdout", "stderr"))
    if answer.get("preexec_error"):
        raise subprocess.SubprocessError(f"Exception occurred in preexec_fn: {answer['preexec_error']}")
    if answer.get("timed_out"):
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(command, answer["returncode"], stdout, stderr)


def start(argv: list, cwd: Path | str = ROOT, env: dict | None = None, stdout=None, stderr=None,
          text: bool = False) -> "Started | subprocess.Popen":
    """`python -m training *argv` started, not waited for, as subprocess.Popen(..., stdout=stdout,
    stderr=stderr, text=text, process_group=0) starts it; stdout/stderr: None, PIPE, DEVNULL, STDOUT
    (stderr), a file object or an fd."""
    argv, env, command = _command(None, argv, env)
    if not _SERVER.usable(env):
        return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                text=text, process_group=0)
    return Started(command, {"argv": argv, "cwd": str(cwd), "env": env}, stdout, stderr, text)


class Started:
    """A forked `python -m training` that runs on its own: the part of subprocess.Popen's interface tests use.
    The server reaps it only when asked (poll, wait), so its pid stays its own until the handle saw it end."""

    def __init__(self, args: list[str], request: dict, stdout, stderr, text: bool):
        self.args, self.returncode, self.stdout, self.stderr = args, None, None, None
        self._readers: list[threading.Thread] | None = None
        self._read: dict[str, object] = {}
        targets, ours = [], []
        try:
            for name, spec, inherited in (("stdout", stdout, 1), ("stderr", stderr, 2)):
                if spec == subprocess.PIPE:
                    read_end, write_end = os.pipe()
                    ours.append(write_end)
                    targets.append(write_end)
                    setattr(self, name, os.fdopen(read_end, "r" if text else "rb", **_text_options(text)))
                elif spec == subprocess.DEVNULL:
                    ours.append(os.open(os.devnull, os.O_WRONLY))
                    targets.append(ours[-1])
                elif spec == subprocess.STDOUT and name == "stderr":
                    targets.append(targets[0])
                elif spec is None:
                    targets.append(inherited)
                else:
                    targets.append(spec if isinstance(spec, int) else spec.fileno())
            self.pid = _SERVER.ask(request | {"op": "start"}, fds=targets)["pid"]
        except BaseException:
            for stream in (self.stdout, self.stderr):
                if stream is not None:
                    stream.close()
            raise
        finally:
            for fd in ours:  # the child has its copies: EOF on a pipe once the child is gone
                os.close(fd)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            answer = _SERVER.ask({"op": "wait", "pid": self.pid, "timeout": timeout})
            if answer["returncode"] is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = answer["returncode"]
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # as Popen: never signal a pid that may have been reused
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout: float | None = None) -> tuple:
        """Read the pipes to their end, then wait; (stdout, stderr) as Popen.communicate returns them."""
        import time

        if input is not None:
            raise ValueError("the command's stdin is /dev/null")
        if self._readers is None:
            def read_all(name: str, stream) -> None:
                self._read[name] = stream.read()
                stream.close()

            self._readers = [threading.Thread(target=read_all, args=(name, stream), daemon=True)
                             for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)) if stream]
            for reader in self._readers:
                reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in self._readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._read.get("stdout"), self._read.get("stderr")


def _text_options(text: bool) -> dict:
    """What Popen(text=True) makes of a pipe: locale encoding, universal newlines."""
    import locale

    return {"encoding": locale.getpreferredencoding(False)} if text else {}


def pipe_text(data: bytes) -> str:
    """What text=True makes of a pipe's bytes: locale encoding, universal newlines (\\r too)."""
    import locale

    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


class _Server:
    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.start_env: dict | None = None
        self.fds: socket.socket | None = None  # carries a started command's stdout/stderr fds to the server
        self.lock = threading.Lock()

    def usable(self, env: dict) -> bool:
        if not (sys.platform.startswith("linux") and hasattr(os, "fork")) or os.environ.get("CLI_RUNNER") == "off":
            return False
        base = self.start_env if self.start_env is not None else self._server_env()
        changed = {k for k in env.keys() | base.keys() if env.get(k) != base.get(k)} - {"PYTHONPATH", *SELF_SET_ENV}
        return not any(k.startswith(IMPORT_TIME_ENV) for k in changed)

    @staticmethod
    def _server_env() -> dict:
        return dict(os.environ) | {"PYTHONPATH": str(ROOT)}

    def _start(self) -> None:
        self.start_env = self._server_env()
        if self.fds is not None:
            self.fds.close()
        self.fds, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        code = ("import importlib.util as u; s = u.spec_from_file_location('cli_runner', %r); "
                "m = u.module_from_spec(s); s.loader.exec_module(m); m.serve(%d)"
                % (str(Path(__file__).resolve()), theirs.fileno()))
        with theirs:
            self.process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=self.start_env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(theirs.fileno(),))

    def ask(self, request: dict, fds: list[int] = ()) -> dict:
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
            if fds:
                socket.send_fds(self.fds, [b"f"], list(fds))
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the CLI runner's server exited ({self.process.wait()})")
            return json.loads(line)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


_SERVER = _Server()
atexit.register(_SERVER.stop)


# ---------------------------------------------------------------- the server side


def serve(fd_socket: int | None = None) -> None:
    """Read one JSON request a line from stdin, answer one JSON line on stdout, until stdin closes; a start
    request's stdout/stderr fds come over the Unix socket `fd_socket`. Started commands still running when
    stdin closes are killed."""
    requests, answers = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    fds = socket.socket(fileno=fd_socket) if fd_socket is not None else None
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # the child reads nothing of the protocol
    os.dup2(2, 1)
    _preload()
    protocol_fds = (requests.fileno(), answers.fileno()) + ((fds.fileno(),) if fds else ())
    started = set()
    for line in requests:
        request = json.loads(line)
        op = request.get("op", "run")
        if op == "run":
            answer = _serve_one(request, protocol_fds)
        elif op == "start":
            answer = {"pid": _start_one(request, socket.recv_fds(fds, 1, 2)[1], protocol_fds)}
            started.add(answer["pid"])
        else:  # wait
            status = _wait(request["pid"], request["timeout"])
            answer = {"returncode": None if status is None else os.waitstatus_to_exitcode(status)}
            if status is not None:
                started.discard(request["pid"])
        answers.write(json.dumps(answer).encode() + b"\n")
        answers.flush()
    for pid in started:
        _kill_group(pid)
        os.waitpid(pid, 0)


def _preload() -> None:
    import importlib
    import pkgutil

    import training
    import training.cli  # noqa: F401

    for name in PRELOAD:
        try:
            module = importlib.import_module(name)
            for attr in PRELOAD_NAMES.get(name, ()):
                getattr(module, attr)
        except BaseException:  # noqa: BLE001 - preloading is only a head start; the child imports what it needs
            pass
    for info in pkgutil.walk_packages(training.__path__, "training."):
        if info.name == "training.__main__":
            continue  # importing it runs the CLI
        try:
            importlib.import_module(info.name)
        except Exception:  # noqa: BLE001
            pass


def _wait(pid: int, timeout: float | None) -> int | None:
    """The wait status of child `pid` once it ends within `timeout` seconds (None: no limit), else None."""
    import select
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(0.01 if left is None else min(0.01, left))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_group(pid: int) -> None:
    """SIGKILL the command and whatever it started."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except OSError:
            pass


def _fork(request: dict, outputs: tuple[int, int], preexec_path: str | None, protocol_fds: tuple) -> int:
    """Fork the child that runs the request with `outputs` as its fds 1 and 2, in its own process group."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(request, outputs, preexec_path, protocol_fds)  # never returns
    try:
        os.setpgid(pid, pid)  # the child does it too: whichever runs first, the group exists on return
    except OSError:
        pass
    return pid


def _start_one(request: dict, outputs: list[int], protocol_fds: tuple) -> int:
    """A child that runs on its own, writing to the test's fds; their copies here are closed."""
    try:
        return _fork(request | {"drop_dac": False}, (outputs[0], outputs[1]), None, protocol_fds)
    finally:
        for fd in outputs:
            os.close(fd)


def _serve_one(request: dict, protocol_fds: tuple) -> dict:
    import shutil
    import tempfile

    # not TemporaryDirectory: its atexit finalizer would run in the child and delete the outputs
    folder = tempfile.mkdtemp(prefix="cli_runner_")
    try:
        out_path, err_path, preexec_path = (os.path.join(folder, n) for n in ("stdout", "stderr", "preexec"))
        outputs = tuple(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for path in (out_path, err_path))
        try:
            pid = _fork(request, outputs, preexec_path, protocol_fds)
        finally:
            for fd in outputs:
                os.close(fd)
        status = _wait(pid, request["timeout"])
        timed_out = status is None
        if timed_out:
            _kill_group(pid)
            _, status = os.waitpid(pid, 0)
        answer = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}
        for name, path in (("stdout", out_path), ("stderr", err_path)):
            answer[name] = base64.b64encode(Path(path).read_bytes() if os.path.exists(path) else b"").decode()
        if os.path.exists(preexec_path):
            answer["preexec_error"] = Path(preexec_path).read_text()
        return answer
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _child(request: dict, outputs: tuple[int, int], preexec_path: str | None, protocol_fds: tuple) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # a timeout kills the command and whatever it started
        for fd in protocol_fds:
            os.close(fd)
        for fd, target in ((1, outputs[0]), (2, outputs[1])):
            os.dup2(target, fd)
        for target in set(outputs) - {1, 2}:
            os.close(target)
        os.environ.clear()
        os.environ.update(request["env"])
        _startup_path(request["env"].get("PYTHONPATH", ""))
        import tempfile

        tempfile.tempdir = None  # TMPDIR of the request, not the server's
        os.chdir(request["cwd"])
        if request["drop_dac"]:
            try:
                _drop_dac_from_this_process()
            except Exception as exc:  # noqa: BLE001 - reported as subprocess reports a failed preexec_fn
                Path(preexec_path).write_text(str(exc))
                os._exit(255)
        code = _run_as_main(request["argv"], request.get("script"))
    except BaseException:  # noqa: BLE001 - the runner itself failed (a sitecustomize too, as at a fresh start): exit 1
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _startup_path(pythonpath: str) -> None:
    """What a fresh interpreter does with the request's PYTHONPATH at startup: folders the server's sys.path
    lacks go first (after the working folder, before site-packages), and a sitecustomize.py in one of them
    runs (site.py imports the first on sys.path; the server's venv has none)."""
    import importlib

    added = [p for p in dict.fromkeys(pythonpath.split(os.pathsep)) if p and os.path.abspath(p) not in
             {os.path.abspath(q) for q in sys.path}]
    sys.path[1:1] = added
    if any(os.path.isfile(os.path.join(p, "sitecustomize.py")) for p in added):
        sys.modules.pop("sitecustomize", None)
        importlib.invalidate_caches()
        importlib.import_module("sitecustomize")


def _run_as_main(argv: list[str], script: str | None = None) -> int:
    """`python -m training *argv` (or `python SCRIPT *argv`) in this process: the exit code the interpreter
    would give (an uncaught KeyboardInterrupt ends it by SIGINT, as the interpreter does since 3.8)."""
    import runpy
    import traceback

    # `python -m` puts the working folder first, `python SCRIPT` the script's folder
    sys.path[0] = os.path.dirname(os.path.abspath(script)) if script else os.getcwd()
    sys.argv = [script, *argv] if script else ["-m", *argv]
    interrupted = False
    try:
        if script:
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module("training", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        if done.code is None:
            code = 0
        elif isinstance(done.code, int):
            code = done.code
        else:
            print(done.code, file=sys.stderr)
            code = 1
    except BaseException as exc:  # noqa: BLE001 - as the interpreter does: traceback on stderr, exit 1
        traceback.print_exc()
        code, interrupted = 1, isinstance(exc, KeyboardInterrupt)
    try:
        if hasattr(threading, "_shutdown"):
            threading._shutdown()  # wait for non-daemon threads, as interpreter exit does
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    if interrupted:
        _end_by_sigint()
    return code


def _end_by_sigint() -> None:
    """End this process by SIGINT, as the interpreter ends on an uncaught KeyboardInterrupt (exit -2)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
