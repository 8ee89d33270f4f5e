"""A headless Chromium driven over the DevTools protocol: just enough for tests/comfyui/test_browser.py.

`Chromium` starts the browser with a temp profile; `page()` connects to its first tab and
returns a `Page` with `navigate`, `evaluate` (awaits promises, returns JSON values),
`wait_for` and `screenshot`. Console errors and uncaught exceptions are collected in
`Page.errors`. Needs the `websocket-client` package (requirements-dev.txt).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import websocket

from host_helpers import stop_process

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
STARTUP_TIMEOUT_S = 30


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSER_NAMES) if path), None)


class CDPError(RuntimeError):
    """The browser refused a command, or page JavaScript threw."""


class Chromium:
    def __init__(self, binary: str, width: int = 1400, height: int = 1000):
        self.binary, self.width, self.height = binary, width, height
        self.process = None
        self.profile = None
        self.http = None

    def __enter__(self) -> Chromium:
        self.profile = tempfile.mkdtemp(prefix="cdp-profile-")
        command = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", "--disable-dev-shm-usage", f"--window-size={self.width},{self.height}",
                   f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.http = self._read_devtools_address()
        return self

    def _read_devtools_address(self) -> str:
        # Chromium prints "DevTools listening on ws://127.0.0.1:<port>/devtools/browser/<id>" on stderr;
        # keep draining stderr afterwards so a chatty browser never blocks on a full pipe.
        found: dict = {}
        ready = threading.Event()
        lines: list[str] = []

        def drain():
            for text in self.process.stderr:
                lines.append(text)
                match = re.search(r"DevTools listening on ws://([^/\s]+)/", text)
                if match and not ready.is_set():
                    found["host"] = match.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(STARTUP_TIMEOUT_S) or "host" not in found:
            raise CDPError("chromium did not start:\n" + "".join(lines[-20:]))
        return f"http://{found['host']}"

    def page(self) -> Page:
        with urllib.request.urlopen(self.http + "/json/list", timeout=10) as response:
            targets = json.load(response)
        tab = next(t for t in targets if t.get("type") == "page")
        return Page(tab["webSocketDebuggerUrl"])

    def __exit__(self, *exc) -> None:
        stop_process(self.process, timeout=10)
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, ws_url: str, timeout: float = 60):
        # No Origin header: Chromium refuses DevTools websockets from other origins.
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.ids = itertools.count(1)
        self.errors: list[str] = []
        self.send("Runtime.enable")
        self.send("Page.enable")

    def send(self, method: str, **params) -> dict:
        """One command; waits for its answer, collecting the events that arrive meanwhile."""
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._on_event(message)

    def _on_event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression (a promise is awaited); a throw raises CDPError."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.25):
        """Polls until the expression is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except CDPError:  # e.g. while the page is still navigating
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                errors = "\n".join(self.errors[-5:])
                raise TimeoutError(f"not true within {timeout} s: {expression}\npage errors:\n{errors}")
            time.sleep(interval)

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        params = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        self.ws.close()
