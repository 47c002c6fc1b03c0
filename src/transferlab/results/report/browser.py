"""Open an HTML file in headless Chromium and say whether it renders cleanly; take screenshots.

Uses the Chrome DevTools protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4, JSON
messages separated by NUL bytes) with the standard library only. ``check_page`` collects every console
error, uncaught exception and browser log error (a blocked request, a Content-Security-Policy violation,
an image that fails to decode), counts the ``<img>`` elements and those that did not render
(``naturalWidth == 0``), and can save screenshots of the page or of one element.

Chromium runs with ``--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
--disable-background-networking --disable-component-update --disable-sync`` and a throw-away profile.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.files import write_bytes

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or did not answer in time."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary (``$CHROMIUM`` first), or None."""
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Shot:
    """A screenshot to take: the viewport top (``selector`` None) or the element ``selector`` matches."""

    path: str | Path
    selector: str | None = None
    max_height: int = 2400
    """Element shots are cut to this height (CSS pixels)."""


@dataclass
class PageCheck:
    """What Chromium saw: errors, the number of images and of images that did not render."""

    url: str
    errors: list[str] = field(default_factory=list)
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    """``alt`` text (or start of ``src``) of every ``<img>`` with naturalWidth 0."""
    title: str = ""
    body_data: dict[str, str] = field(default_factory=dict)
    """``document.body.dataset`` after the load event."""
    screenshots: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.broken_images


class _Pipe:
    """The DevTools protocol over a pipe: send commands, read replies and events."""

    def __init__(self, binary: str, profile: str, width: int, height: int) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # high descriptor numbers, so putting them on 3 and 4 in the child cannot clobber one another
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds() -> None:  # Python's own descriptors are non-inheritable, so Chromium gets just 0-4
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)
            os.close(hi_r)
            os.close(hi_w)

        args = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=False, preexec_fn=child_fds
        )
        os.close(hi_r)
        os.close(hi_w)
        self.w, self.r = to_chrome_w, from_chrome_r
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 30) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"Chromium refused {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read(deadline, method)
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"Chromium did not answer {what} in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise BrowserError(f"Chromium exited (code {self.proc.poll()}) while waiting for {what}: {err}")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            os.write(self.w, json.dumps({"id": self.next_id + 1, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.w, self.r):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()


_IMAGES_JS = """JSON.stringify({
  title: document.title,
  images: document.images.length,
  broken: Array.prototype.slice.call(document.images)
    .filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
    .map(function (i) { return i.alt || String(i.src).slice(0, 80); }),
  body: Object.assign({}, document.body ? document.body.dataset : {})
})"""


def _errors_from(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for ev in events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            out.append(f"{e.get('source', 'log')}: {e.get('text', '')} {e.get('url', '')}".strip())
    return out


def check_page(
    path: str | Path,
    screenshots: Sequence[Shot] = (),
    width: int = 1400,
    height: int = 2000,
    binary: str | None = None,
    timeout: float = 60,
) -> PageCheck:
    """Load ``path`` in headless Chromium; return errors, image counts and the screenshots taken."""
    binary = binary or find_chromium()
    if not binary:
        raise BrowserError("no Chromium found (install Debian's 'chromium' package, or set $CHROMIUM)")
    path = Path(path).resolve()
    if not path.is_file():
        raise BrowserError(f"{path}: no such file")
    url = path.as_uri()
    result = PageCheck(url)
    with tempfile.TemporaryDirectory(prefix="transferlab-chromium-") as profile:
        pipe = _Pipe(binary, profile, width, height)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            pipe.send("Emulation.setDeviceMetricsOverride", metrics, session=session)
            pipe.send("Page.navigate", {"url": url}, session=session)
            pipe.wait_event("Page.loadEventFired", timeout=timeout)
            time.sleep(0.3)  # let late console messages arrive
            info = json.loads(pipe.send("Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True}, session=session)["result"]["value"])
            result.title, result.images, result.broken_images, result.body_data = info["title"], info["images"], info["broken"], info["body"]
            for shot in screenshots:
                params: dict[str, Any] = {"format": "png"}
                if shot.selector:
                    expr = (
                        f"(function(){{var e=document.querySelector({json.dumps(shot.selector)});if(!e)return null;"
                        "var r=e.getBoundingClientRect();return [r.left+window.scrollX,r.top+window.scrollY,r.width,r.height];})()"
                    )
                    box = pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)["result"].get("value")
                    if not box:
                        raise BrowserError(f"{path}: no element matches {shot.selector!r} for a screenshot")
                    x, y, w, h = box
                    params.update(clip={"x": x, "y": y, "width": w, "height": min(h, shot.max_height), "scale": 1}, captureBeyondViewport=True)
                data = pipe.send("Page.captureScreenshot", params, session=session, timeout=timeout)["data"]
                out = Path(shot.path)
                write_bytes(out, base64.b64decode(data))
                result.screenshots.append(out)
            # drain what is left, then collect the errors
            try:
                pipe.send("Runtime.evaluate", {"expression": "1"}, session=session)
            except BrowserError:
                pass
            result.errors = _errors_from(pipe.events)
        finally:
            pipe.close()
    return result
