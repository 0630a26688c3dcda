"""Open a page in headless Chromium through the DevTools protocol over a pipe (no extra Python package):
collect console errors and exceptions, check every <img>, take a screenshot.

``python tests/chromium.py PAGE.html SHOT.png`` prints what it found.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find() -> str | None:
    return next((p for name in CANDIDATES if (p := shutil.which(name))), None)


@dataclass
class PageCheck:
    images: list[dict] = field(default_factory=list)  # src prefix, complete, naturalWidth
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    title: str = ""
    screenshot: Path | None = None


class _Pipe:
    def __init__(self, binary: str, profile: str):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def child_fds() -> None:  # chromium reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4, to_child_r, from_child_w), preexec_fn=child_fds)  # 3, 4 kept after the dup2
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while True:
            ev = self._read(deadline)
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def check_page(page: Path, screenshot: Path | None = None, width: int = 1400, height: int = 1800,
               binary: str | None = None, full_page: bool = False) -> PageCheck:
    binary = binary or find()
    if binary is None:
        raise FileNotFoundError("no chromium binary on PATH")
    out = PageCheck()
    with tempfile.TemporaryDirectory(prefix="privbench-chromium-") as profile:
        pipe = _Pipe(binary, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            pipe.send("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=session)
            pipe.wait_event("Page.loadEventFired")
            result = pipe.send("Runtime.evaluate", {"returnByValue": True, "awaitPromise": True, "expression": """
                (async () => {
                  const imgs = Array.from(document.images);
                  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
                  return {title: document.title, images: imgs.map(i => ({src: i.src.slice(0, 40),
                          complete: i.complete, naturalWidth: i.naturalWidth}))};
                })()"""}, session=session)["result"]["value"]
            out.images, out.title = result["images"], result["title"]
            if screenshot is not None:
                if full_page:  # the whole page in one image (capped)
                    full = pipe.send("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                                          "returnByValue": True}, session=session)["result"]["value"]
                    pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": min(int(full), 16000),
                                                                      "deviceScaleFactor": 1, "mobile": False},
                              session=session)
                shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                out.screenshot = screenshot
            pipe.send("Runtime.evaluate", {"expression": "0"}, session=session)  # flush pending events
            for ev in pipe.events:
                method, params = ev.get("method"), ev.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    out.errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                             for a in params.get("args", [])))
                elif method == "Runtime.exceptionThrown":
                    out.errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    out.errors.append("log: " + params["entry"].get("text", ""))
                elif method == "Network.loadingFailed":
                    out.errors.append("load failed: " + params.get("errorText", ""))
                elif method == "Network.requestWillBeSent":
                    url = params.get("request", {}).get("url", "")
                    if not url.startswith(("file:", "data:", "about:")):
                        out.errors.append(f"network request: {url}")
        finally:
            pipe.close()
    return out


if __name__ == "__main__":
    found = check_page(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None, full_page=True)
    print(json.dumps({"title": found.title, "images": len(found.images),
                      "broken": [i for i in found.images if not i["naturalWidth"]], "errors": found.errors}, indent=1))
