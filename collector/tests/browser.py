#!/usr/bin/env python3
"""Drives a headless Chromium over the DevTools protocol, for the dashboard's test.

    browser.py CHROMIUM

Commands on stdin, one per line; one JSON answer per command on stdout:
    open URL            navigate the page; {"ok": true} once loaded
    eval JS             {"value": <the expression's value>} or {"error": "..."}
    wait SECONDS JS     evaluate JS until it is truthy: {"value": ...}, or
                        {"error": "timeout", "last": <its last value>}
    shot PATH           a PNG of the whole page to PATH: {"ok": true, "bytes": N}
    quit
Needs websocket-client (the tools venv).
"""
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket


class Browser:
    def __init__(self, chromium):
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={self.profile.name}",
                "--window-size=1440,1000",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        endpoint = None
        seen = []
        for line in self.proc.stderr:
            seen.append(line)
            m = re.search(r"DevTools listening on (ws://[^\s]+)", line)
            if m:
                endpoint = m.group(1)
                break
        if not endpoint:
            raise SystemExit("chromium did not start:\n" + "".join(seen[-20:]))
        host = endpoint.split("/")[2]
        pages = []
        deadline = time.time() + 30
        while not pages and time.time() < deadline:
            with urllib.request.urlopen(f"http://{host}/json/list") as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if not pages:
                time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": 1440, "height": 1000, "deviceScaleFactor": 1, "mobile": False})

    def call(self, method, params=None, wait_event=None):
        self.next_id += 1
        me = self.next_id
        self.ws.send(json.dumps({"id": me, "method": method, "params": params or {}}))
        result = None
        got_event = wait_event is None
        while result is None or not got_event:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == me:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result = msg.get("result", {})
            elif wait_event and msg.get("method") == wait_event:
                got_event = True
        return result

    def eval(self, js):
        r = self.call("Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"].get("exception", {}).get("description", "exception"))
        return r.get("result", {}).get("value")

    def shot(self, path):
        m = self.call("Page.getLayoutMetrics")
        size = m.get("cssContentSize") or m["contentSize"]
        r = self.call("Page.captureScreenshot", {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        })
        data = base64.b64decode(r["data"])
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def close(self):
        try:
            self.ws.close()
        finally:
            # Chromium's helpers too: they share its session.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.profile.cleanup()


def main():
    b = Browser(sys.argv[1])
    print(json.dumps({"ok": True}), flush=True)
    try:
        for line in sys.stdin:
            cmd, _, rest = line.rstrip("\n").partition(" ")
            try:
                if cmd == "open":
                    b.call("Page.navigate", {"url": rest}, wait_event="Page.loadEventFired")
                    out = {"ok": True}
                elif cmd == "eval":
                    out = {"value": b.eval(rest)}
                elif cmd == "wait":
                    secs, _, js = rest.partition(" ")
                    deadline = time.time() + float(secs)
                    last = None
                    out = None
                    while time.time() < deadline:
                        last = b.eval(js)
                        if last:
                            out = {"value": last}
                            break
                        time.sleep(0.1)
                    if out is None:
                        out = {"error": "timeout", "last": last}
                elif cmd == "shot":
                    out = {"ok": True, "bytes": b.shot(rest)}
                elif cmd == "quit":
                    break
                else:
                    out = {"error": f"unknown command {cmd!r}"}
            except Exception as e:  # one answer per command, whatever failed
                out = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(out), flush=True)
    finally:
        b.close()


if __name__ == "__main__":
    main()
