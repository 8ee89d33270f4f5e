"""Helpers for the tests that run prompts in the real host: a small SD1.5-layout checkpoint,
the subject photos in input/, small versions of the example prompts, a websocket listener."""
from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import socket
import struct
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "examples_workflows"
SUBJECT_PHOTOS = ROOT / "training" / "sample_data" / "subject"
CHECKPOINT = "sd15_mini_random.safetensors"
EXAMPLES = ("three_scene_lora", "three_scene_dreambooth", "rank_sweep")


def build_test_checkpoint(path: Path) -> None:
    """The random-weight SD1.5-layout checkpoint, written to `path` (build 10 s, save 2 s)."""
    import torch

    from training.models import build_random, save_single_file

    save_single_file(build_random("sd15-mini", seed=1, dtype=torch.float16), path)


def shared_test_checkpoint(folder: Path) -> Path:
    """folder/CHECKPOINT, built by the first process that asks; the others (the second xdist worker) wait on a
    lock file and take that one."""
    import fcntl

    path = folder / CHECKPOINT
    with open(folder / f"{CHECKPOINT}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():  # written atomically: a file that is there is whole
            build_test_checkpoint(path)
    return path


def ensure_test_inputs(server) -> None:
    """A random-weight SD1.5-layout checkpoint in models/checkpoints (ComfyUI detects it as SD1.5)
    and the sample subject photos in input/subject. Made once per server; with a server.build_cache the
    checkpoint is built once per test run there and hard-linked into each server."""
    target = server.base_dir / "models" / "checkpoints" / CHECKPOINT
    if not target.is_file():
        if server.build_cache is None:
            build_test_checkpoint(target)
        else:
            built = shared_test_checkpoint(server.build_cache)
            try:
                os.link(built, target)  # no test writes into it (writes are temp + rename)
            except OSError:  # another file system
                shutil.copy2(built, target)
    photos = server.base_dir / "input" / "subject"
    if not photos.is_dir():
        photos.mkdir(parents=True)
        for path in SUBJECT_PHOTOS.glob("*.jpg"):
            shutil.copy2(path, photos / path.name)


def load_workflow(name: str, api: bool = False) -> dict:
    folder = WORKFLOWS / "api" if api else WORKFLOWS
    return json.loads((folder / f"{name}.json").read_text())


def small_prompt(api: dict, **overrides) -> dict:
    """An example's API prompt made small: the test checkpoint, 64 px, a few steps, 2 class images."""
    api = copy.deepcopy(api)
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        for name in ("ckpt_name", "checkpoint", "base_checkpoint"):
            if isinstance(inputs.get(name), str):
                inputs[name] = CHECKPOINT
        if kind == "DreamBoothPrepareSubjectDataset":
            inputs["resolution"] = 64
        elif kind == "DreamBoothClassImages":
            inputs.update(resolution=64, count=2, steps=2)
        elif kind == "DreamBoothTrainSubject":
            inputs["steps"] = 3
            if inputs["method"] == "dreambooth":  # changes that survive the fp16 file, for the extraction
                inputs["learning_rate"] = 1e-4
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "DreamBoothSubjectFidelity":
            inputs["face_detector"] = "hog"
    for node_id, values in overrides.items():
        api[node_id]["inputs"].update(values)
    return api


def nodes_of(api: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in api.items() if node["class_type"] == class_type]


def post_prompt_raw(server, prompt: dict, client_id: str = "pytest") -> tuple[int, dict]:
    """(HTTP status, answer) of POST /prompt, without failing on a refusal."""
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    request = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode() or "{}")


def post(server, path: str, data: dict | None = None) -> None:
    request = urllib.request.Request(server.url + path, data=json.dumps(data or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


def error_message(entry: dict) -> str | None:
    """The exception message of a failed prompt's history entry."""
    for event, data in entry["status"].get("messages", []):
        if event == "execution_error":
            return data.get("exception_message", "")
    return None


class WebSocket:
    """Just enough of a websocket client (RFC 6455) to read ComfyUI's JSON messages."""

    def __init__(self, url: str, client_id: str, timeout: float = 120):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._read_some()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _read_some(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("websocket closed")
        return chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._read_some()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # client frames are masked
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def receive(self) -> dict | None:
        """The next JSON message; None for a binary one (previews)."""
        message, text = b"", None
        while True:
            first, second = self._take(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._take(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._take(8))[0]
            payload = self._take(length)
            opcode = first & 0x0F
            if opcode == 9:  # ping
                self._send(10, payload)
                continue
            if opcode == 8:
                raise ConnectionError("websocket closed by the server")
            if opcode in (1, 2):
                text = opcode == 1
            message += payload
            if first & 0x80:
                return json.loads(message) if text else None

    def close(self) -> None:
        self.sock.close()


def stop_process(process, timeout: float) -> None:
    """SIGTERM a child we started (a server started in the background ignores SIGINT), then SIGKILL it if it
    has not exited within `timeout` seconds."""
    import subprocess

    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
