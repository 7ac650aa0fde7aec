"""Browser test of the chat page: headless Chromium (Debian's `chromium`) driven over the DevTools
protocol loads /, types a message, sends it, and the streamed answer (markdown rendered) and the
thinking block appear in the DOM.

Skips with a reason when /usr/bin/chromium is absent (CI installs it: apt-get install -y chromium).
The server is real (uvicorn on loopback); the engine is the scripted one, so the text is known.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from nanoseek.serve import ServeConfig, create_app
from serve_fakes import LiveServer, ScriptedEngine, tiny_tokenizer

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
)
websockets_sync = pytest.importorskip("websockets.sync.client", reason="needs the websockets package")


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(websockets_sync.connect(ws_url, max_size=None, open_timeout=20))
        self._ids = itertools.count(1)

    def call(self, method: str, timeout: float = 20.0, **params) -> dict:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",  # the chosen port is written to DevToolsActivePort
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [
            t
            for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            if t["type"] == "page"
        ]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_chat_page_streams_answer(browser):
    tok = tiny_tokenizer()
    reasoning = "First, 2 + 2 = 4."
    answer = "The answer is **4**.\n\n- one\n- two <script>alert(1)</script>"

    def reply(prompt, params):
        return tok.encode(f"{reasoning}\n</think>\n\n{answer}")

    engine = ScriptedEngine(tok, reply, step_delay=0.05)  # ~2 s of streaming: partial states are visible
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        browser.call("Page.enable")
        browser.call("Runtime.enable")
        browser.call("Page.navigate", url=srv.url + "/")
        deadline = time.time() + 30
        while browser.js("document.readyState") != "complete" or not browser.js(
            "document.getElementById('model').textContent.includes('web-test')"
        ):
            assert time.time() < deadline, "page did not load / did not find the model"
            time.sleep(0.1)
        browser.js("document.getElementById('max-tokens').value = '100'")
        browser.js("document.getElementById('input').focus()")
        browser.call("Input.insertText", text="What is 2 + 2?")
        browser.js("document.getElementById('send').click()")

        seen_partial = False
        deadline = time.time() + 60
        while True:
            state = browser.js(
                "(() => { const m = document.querySelector('.msg.assistant');"
                " return m ? [m.dataset.state, m.querySelector('.answer').textContent,"
                " m.querySelector('.reasoning').textContent] : null; })()"
            )
            if state and state[0] == "streaming" and 0 < len(state[2]) < len(reasoning):
                seen_partial = True
            if state and state[0] == "done":
                break
            assert time.time() < deadline, f"no finished answer in the DOM: {state}"
            time.sleep(0.05)

        user = browser.js("document.querySelector('.msg.user').textContent")
        assert "What is 2 + 2?" in user
        html = browser.js("document.querySelector('.msg.assistant .answer').innerHTML")
        assert "<strong>4</strong>" in html  # markdown rendered
        assert "<li>one</li>" in html
        assert "<script>" not in html and "&lt;script&gt;" in html  # model output is escaped, never run
        thinking = browser.js(
            "document.querySelector('.msg.assistant details.thinking .reasoning').textContent"
        )
        assert thinking.strip() == reasoning
        assert (
            browser.js("document.querySelector('.msg.assistant details.thinking').open") is False
        )  # collapsed
        assert seen_partial, "the reasoning never appeared partially: the page did not stream"
        # the conversation is kept: a second message sends the whole history
        browser.js("document.getElementById('input').value = 'And 3 + 3?'")
        browser.js("document.getElementById('send').click()")
        deadline = time.time() + 60
        while browser.js("document.querySelectorAll('.msg.assistant[data-state=done]').length") < 2:
            assert time.time() < deadline
            time.sleep(0.05)
        prompt_ids, params = engine.added[-1]
        text = tok.decode(prompt_ids)
        assert "What is 2 + 2?" in text and "And 3 + 3?" in text and "The answer is" in text
        assert reasoning not in text  # reasoning is not sent back
        assert params.max_new_tokens == 100
        # the conversation survives a reload, and "New chat" clears it
        browser.call("Page.reload")
        deadline = time.time() + 30
        while (
            browser.js("document.readyState") != "complete"
            or browser.js("document.querySelectorAll('.msg').length") < 4
        ):
            assert time.time() < deadline, "conversation not restored after reload"
            time.sleep(0.1)
        assert "<strong>4</strong>" in browser.js(
            "document.querySelector('.msg.assistant .answer').innerHTML"
        )
        assert (
            browser.js("document.querySelector('.msg.assistant .reasoning').textContent").strip() == reasoning
        )
        browser.js("document.getElementById('clear').click()")
        assert browser.js("document.querySelectorAll('.msg').length") == 0
        assert browser.js("localStorage.getItem('nanoseek:conversation')") == "[]"
