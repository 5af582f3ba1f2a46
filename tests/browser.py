"""A real headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands
on the browser's fd 3, answers on its fd 4, each a JSON message ended by a NUL byte): no Python package.
Used by tests/test_class.py and to take the README's screenshots; not collected by pytest.

    with Browser() as b:
        b.open("http://127.0.0.1:8000/?code=ABCD")
        b.wait("document.querySelectorAll('.reply').length > 0")
        b.eval("document.querySelector('.reply').click()")
        png = b.screenshot()
"""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium():
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class Browser:
    def __init__(self, width=420, height=760, timeout=60):
        path = find_chromium()
        if path is None:
            raise FileNotFoundError("no Chromium on this machine: apt-get install chromium")
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_browser, self.w = os.pipe()           # we write commands, the browser reads them as fd 3
        self.r, from_browser = os.pipe()         # the browser writes answers as fd 4, we read them

        def fds():                               # in the child, before exec: fds 3 and 4 as Chromium wants
            os.dup2(to_browser, 100)             # (through free numbers: either pipe end may be 3 or 4)
            os.dup2(from_browser, 101)
            os.dup2(100, 3)
            os.dup2(101, 4)

        self.proc = subprocess.Popen(
            [path, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.next_id, self.buffer, self.timeout, self.session = 0, b"", timeout, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method, **params):
        """Send one command (to the page once attached) and return its result."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self.next_id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer["result"]
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"Chromium gave no answer to {method}")
            self.buffer += os.read(self.r, 1 << 20)

    def eval(self, expression):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def open(self, url):
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'")

    def wait(self, condition, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.eval(f"!!({condition})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never had {condition}")
            time.sleep(0.1)

    def key(self, key):
        """A key press as a person makes it (keydown, then keyup)."""
        self.call("Input.dispatchKeyEvent", type="keyDown", key=key, text=key)
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key)

    def screenshot(self):
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self):
        self.proc.kill()
        self.proc.wait()
        for fd in (self.w, self.r):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
