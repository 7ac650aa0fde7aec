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
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
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
    reasoning = "First, <b>2 + 2</b> = 4."  # markup in the reasoning is text, as in the answer
    answer = "The answer is **4**.\n\n- one\n- two <script>alert(1)</script>"

    def reply(prompt, params):
        return tok.encode(f"{reasoning}\n</think>\n\n{answer}")

    engine = ScriptedEngine(tok, reply, step_delay=0.05)  # ~2 s of streaming: partial states are visible
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
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
        assert browser.js("document.querySelectorAll('.msg.assistant .reasoning b').length") == 0
        assert browser.js("document.querySelector('.msg.assistant details.thinking').hidden") is False
        assert (
            browser.js("document.querySelector('.msg.assistant details.thinking').open") is False
        )  # collapsed
        meta = browser.js("document.querySelector('.msg.assistant .meta').textContent")
        assert re.fullmatch(r"\d+ tokens · [\d.]+ tok/s · finish: stop", meta), meta
        _record_fetches(browser)
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
        # ...nor is it a field of the history: DeepSeek's API refuses reasoning_content in input messages
        sent = _chat_bodies(browser)[-1]["messages"]
        assert sent == [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And 3 + 3?"},
        ]
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
        assert browser.js("document.querySelectorAll('.msg.assistant .reasoning b').length") == 0
        browser.js("document.getElementById('clear').click()")
        assert browser.js("document.querySelectorAll('.msg').length") == 0
        assert browser.js("localStorage.getItem('nanoseek:conversation')") == "[]"


def _wait(cond, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.05)


def _record_fetches(browser) -> None:
    """Keep every request body the page sends, as [url, parsed body], in window.__sent."""
    browser.js(
        "window.__sent = []; window.__fetch = window.__fetch || window.fetch;"
        " window.fetch = function (url, opts) { if (opts && opts.body) window.__sent.push([url,"
        " JSON.parse(opts.body)]); return window.__fetch.apply(this, arguments); }; true"
    )


def _chat_bodies(browser, url: str = "/v1/chat/completions") -> list:
    return [b for u, b in browser.js("window.__sent") if u == url]


def _send_and_wait(browser, text: str) -> None:
    """Type `text`, send it, and wait until the page has wound the turn up."""
    n = browser.js("document.querySelectorAll('.msg.assistant[data-state=done]').length")
    browser.js(f"document.getElementById('input').value = {json.dumps(text)}")
    browser.js("document.getElementById('send').click()")
    _wait(
        lambda: browser.js("document.querySelectorAll('.msg.assistant[data-state=done]').length") > n,
        f"no finished turn for {text!r}",
    )


def _last(browser, selector: str) -> str:
    return browser.js(
        f"(() => {{ const a = document.querySelectorAll('.msg.assistant {selector}');"
        " return a.length ? a[a.length - 1].textContent : null; })()"
    )


def _navigate(browser, srv) -> None:
    browser.call("Page.enable")
    browser.call("Runtime.enable")
    browser.call("Page.navigate", url=srv.url + "/")


def _keyed_server() -> tuple[LiveServer, ScriptedEngine]:
    """A live server started with --api-key s3cret, answering "ok", and its engine."""
    tok = tiny_tokenizer()
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("ok"))
    return LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test", api_key="s3cret"))), engine


def _open_page(browser, srv) -> None:
    _navigate(browser, srv)
    deadline = time.time() + 30
    while browser.js("document.readyState") != "complete" or not browser.js(
        "document.getElementById('model').textContent.includes('web-test')"
    ):
        assert time.time() < deadline, "page did not load / did not find the model"
        time.sleep(0.1)


@pytest.mark.slow
def test_new_chat_while_streaming_leaves_no_stale_turn(browser):
    """'New chat' pressed mid-answer: the aborted turn must not land in the new (empty) conversation,
    neither in localStorage nor in what the next message sends."""
    tok = tiny_tokenizer()
    old = "OLDREPLY " * 30

    def reply(prompt, params):
        return tok.encode(f"thinking\n</think>\n\n{old}")

    engine = ScriptedEngine(tok, reply, step_delay=0.05)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        browser.js("document.getElementById('input').value = 'first chat'")
        browser.js("document.getElementById('send').click()")
        deadline = time.time() + 30
        while "OLDREPLY" not in (
            browser.js("(document.querySelector('.msg.assistant .answer') || {}).textContent || ''")
        ):
            assert time.time() < deadline, "the answer never started"
            time.sleep(0.05)
        browser.js("document.getElementById('clear').click()")
        deadline = time.time() + 30
        while browser.js("document.getElementById('stop').disabled") is False:  # the turn has wound up
            assert time.time() < deadline
            time.sleep(0.05)
        assert browser.js("localStorage.getItem('nanoseek:conversation')") == "[]"
        _wait(lambda: engine.aborted, "New chat did not stop the answer being generated")
        browser.js("document.getElementById('input').value = 'second chat'")
        browser.js("document.getElementById('send').click()")
        deadline = time.time() + 30
        while len(engine.added) < 2:
            assert time.time() < deadline, "the second message was not sent"
            time.sleep(0.05)
        text = tok.decode(engine.added[-1][0])
        assert "second chat" in text and "OLDREPLY" not in text and "first chat" not in text


@pytest.mark.slow
def test_enter_while_composing_with_an_ime_does_not_send(browser):
    """Chinese/Japanese input methods confirm a candidate with Enter (keydown has isComposing true): that
    Enter belongs to the IME and must not send the half-typed message."""
    tok = tiny_tokenizer()
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("ok"))
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        browser.js("document.getElementById('input').value = '你好'")
        browser.js(
            "document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown',"
            " {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true, cancelable: true}))"
        )
        time.sleep(0.5)
        assert browser.js("document.querySelectorAll('.msg.user').length") == 0
        assert browser.js("document.getElementById('input').value") == "你好"
        assert not engine.added


@pytest.mark.slow
def test_markdown_emphasis_never_rewrites_a_links_href_or_attributes(browser):
    """`*`/`_` emphasis ran over the whole line after links became tags, so it rewrote the generated
    <a>: href "https://x.com/a*b*c" became ".../a<em>b</em>c" and target="_blank" "<em>blank". Code
    spans likewise."""
    tok = tiny_tokenizer()
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("ok"))
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)

        def links(src: str) -> list:
            return browser.js(
                "(() => { const d = document.createElement('div'); d.innerHTML = window.renderMarkdown("
                + json.dumps(src)
                + "); return [...d.querySelectorAll('a')].map(a => [a.getAttribute('href'),"
                " a.getAttribute('target'), a.textContent]); })()"
            )

        assert links("[l](https://x.com/a*b*c)") == [["https://x.com/a*b*c", "_blank", "l"]]
        assert links("see [docs](https://example.com) for snake_ case") == [
            ["https://example.com", "_blank", "docs"]
        ]
        assert links("[a](https://x.com) and [b](https://y.com/_)") == [
            ["https://x.com", "_blank", "a"],
            ["https://y.com/_", "_blank", "b"],
        ]
        # backticks in a URL are its characters: the code span held first put "<code>" into the href
        assert links("[a](https://x.com/`y`) and `z`") == [["https://x.com/`y`", "_blank", "a"]]
        html = browser.js(
            "window.renderMarkdown('**[a](https://x.com/__init__.py)** and *[`c`](https://y.com)*')"
        )
        assert html == (
            '<p><strong><a href="https://x.com/__init__.py" target="_blank" rel="noopener noreferrer">a</a>'
            '</strong> and <em><a href="https://y.com" target="_blank" rel="noopener noreferrer"><code>c</code>'
            "</a></em></p>"
        )
        # a NUL in the text cannot name another code span's placeholder
        assert (
            browser.js("window.renderMarkdown('`x` \\u00000\\u0000 \\u00007\\u0000')")
            == "<p><code>x</code> 0 7</p>"
        )


@pytest.mark.slow
def test_the_think_switch_renders_the_non_thinking_prompt(browser):
    """The page's "think" box off sends chat_template_kwargs {"thinking": false} (to /tokenize too, so the
    reply's room is counted on the same prompt): the prompt ends <｜Assistant｜></think>."""
    tok = tiny_tokenizer()
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("ok"))
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        for n, on in enumerate((True, False), 1):
            browser.js(f"document.getElementById('think').checked = {'true' if on else 'false'}")
            browser.js("document.getElementById('think').dispatchEvent(new Event('change'))")
            browser.js("document.getElementById('input').value = 'hello'")
            browser.js("document.getElementById('send').click()")
            deadline = time.time() + 30
            while len(engine.added) < n or browser.js("document.getElementById('stop').disabled") is False:
                assert time.time() < deadline, "the message was not answered"
                time.sleep(0.05)
            text = tok.decode(engine.added[-1][0])
            assert text.endswith("<｜Assistant｜><think>\n" if on else "<｜Assistant｜></think>"), text[-40:]
        assert browser.js("localStorage.getItem('nanoseek:think')") == "false"


@contextlib.contextmanager
def _markdown_renderer(browser) -> Iterator[Callable[[str], str]]:
    """The page's own markdown renderer, as a function of the source text."""
    tok = tiny_tokenizer()
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("ok"))
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        yield lambda src: browser.js(f"window.renderMarkdown({json.dumps(src)})")


@pytest.mark.slow
def test_markdown_keeps_products_list_numbers_and_urls_with_parentheses(browser):
    """A math answer's "17 * 23 * 2" lost both asterisks to <em> (CommonMark opens emphasis only before a
    non-space); "1. a" and "2. b" parted by a blank line or text showed "1." twice; and a Wikipedia link's
    "(mathematics)" was cut at its ")"."""
    with _markdown_renderer(browser) as render:
        assert render("17 * 23 * 2 = 782 and 2 ** 3 ** 2") == "<p>17 * 23 * 2 = 782 and 2 ** 3 ** 2</p>"
        assert render("a _ b _ c") == "<p>a _ b _ c</p>"
        assert (
            render("*a* **b** _c_ __d__")
            == "<p><em>a</em> <strong>b</strong> <em>c</em> <strong>d</strong></p>"
        )
        assert render("1. a\n\n2. b\n   more\n3. c") == (
            '<ol><li>a</li></ol>\n<ol start="2"><li>b</li></ol>\n<p>   more</p>\n<ol start="3"><li>c</li></ol>'
        )
        assert render("- x\n- y") == "<ul><li>x</li><li>y</li></ul>"
        url = "https://en.wikipedia.org/wiki/Set_(mathematics)"
        assert render(f"[set]({url})") == (
            f'<p><a href="{url}" target="_blank" rel="noopener noreferrer">set</a></p>'
        )


@pytest.mark.slow
def test_markdown_leaves_underscores_inside_japanese_and_chinese_words(browser):
    """JavaScript's \\W holds every non-ASCII letter, so an underscore between kanji read as the edge of a
    word: "報告書_2024_最終版" (a Japanese file name) lost its underscores to <em>. CommonMark opens "_"
    emphasis inside no word, of any script."""
    with _markdown_renderer(browser) as render:
        assert render("報告書_2024_最終版") == "<p>報告書_2024_最終版</p>"
        assert render("变量_x_的值") == "<p>变量_x_的值</p>"
        assert render("これは _重要_ です") == "<p>これは <em>重要</em> です</p>"
        assert render("「_強調_」と file_name_here") == "<p>「<em>強調</em>」と file_name_here</p>"


@pytest.mark.slow
def test_thought_for_counts_the_thinking_not_the_answer(browser):
    """ "Thought for N s" (DeepSeek's wording) timed the whole turn: a short thought before a long answer
    read as minutes of thinking."""
    tok = tiny_tokenizer()
    answer = "The answer is four. " * 12  # ~20x longer than the thought

    def reply(prompt, params):
        return tok.encode(f"Hmm.\n</think>\n\n{answer}")

    engine = ScriptedEngine(tok, reply, step_delay=0.05)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        browser.js("document.getElementById('input').value = 'What is 2 + 2?'")
        started = time.time()
        browser.js("document.getElementById('send').click()")
        deadline = time.time() + 60
        while not browser.js("!!document.querySelector('.msg.assistant[data-state=done]')"):
            assert time.time() < deadline, "no finished answer"
            time.sleep(0.05)
        elapsed = time.time() - started
        summary = browser.js("document.querySelector('.msg.assistant details.thinking summary').textContent")
        thought = float(summary.removeprefix("Thought for ").removesuffix(" s"))
        assert thought < elapsed / 3, (summary, elapsed)


def _prompt_len(tok, messages: list, thinking: bool = True) -> int:
    """Tokens of a chat prompt as the server renders it (the count /tokenize gives)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, thinking=thinking)
    return len(tok.encode(text))


@pytest.mark.slow
def test_settings_and_the_api_key_reach_the_request(browser):
    """Temperature, max tokens and the think box are what the request carries (to /tokenize too), the key
    is sent as a bearer token (the page and its scripts load without one), usage is asked for, and the
    settings survive a reload."""
    server, engine = _keyed_server()
    with server as srv:
        _navigate(browser, srv)
        _wait(
            lambda: "API key" in browser.js("(document.getElementById('model') || {}).textContent || ''"),
            "the page did not load, or did not say the key is missing",
        )
        for field, value in (("api-key", "s3cret"), ("temperature", "0.3"), ("max-tokens", "7")):
            browser.js(f"document.getElementById('{field}').value = '{value}'")
            browser.js(f"document.getElementById('{field}').dispatchEvent(new Event('change'))")
        browser.js("document.getElementById('think').checked = false")
        browser.js("document.getElementById('think').dispatchEvent(new Event('change'))")
        _wait(
            lambda: "web-test" in browser.js("(document.getElementById('model') || {}).textContent || ''"),
            "no model",
        )
        _record_fetches(browser)
        _send_and_wait(browser, "hello")
        assert _last(browser, ".error") is None
        params = engine.added[-1][1]
        assert (params.temperature, params.max_new_tokens) == (0.3, 7)
        body = _chat_bodies(browser)[-1]
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["chat_template_kwargs"] == {"thinking": False}
        assert _chat_bodies(browser, "/tokenize")[-1]["chat_template_kwargs"] == {"thinking": False}
        # what a stored conversation holds that is not a message (an older page's, a hand edit) is skipped
        kept = json.loads(browser.js("localStorage.getItem('nanoseek:conversation')"))
        junk = [{"role": "assistant", "content": None}, {"role": "system", "content": "x"}, None]
        browser.js(f"localStorage.setItem('nanoseek:conversation', {json.dumps(json.dumps(kept + junk))})")
        browser.call("Page.reload")
        _wait(
            lambda: "web-test" in browser.js("(document.getElementById('model') || {}).textContent || ''"),
            "key lost",
        )
        assert browser.js("document.querySelectorAll('.msg').length") == 2
        assert browser.js("['temperature', 'max-tokens'].map(id => document.getElementById(id).value)") == [
            "0.3",
            "7",
        ]
        assert browser.js("document.getElementById('think').checked") is False


@pytest.mark.slow
def test_the_temperature_and_max_tokens_left_empty_are_the_servers_defaults(browser):
    """The page sent temperature 0.6 and max_tokens 512 of its own with every message, over the server's
    defaults from the checkpoint's generation_config.json (greedy for nanoseek's own checkpoints, as
    `chat` and the API decode them; its max_new_tokens): both boxes now start empty, and empty sends
    none."""
    tok = tiny_tokenizer()
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("ok"))
    defaults = {"temperature": 0.0, "top_p": 0.95, "max_new_tokens": 9}
    config = ServeConfig(model_name="web-test", sampling_defaults=defaults)
    with LiveServer(create_app(engine, tok, config)) as srv:
        _open_page(browser, srv)
        _record_fetches(browser)
        _send_and_wait(browser, "hello")
        assert _last(browser, ".error") is None
        body = _chat_bodies(browser)[-1]
        assert "temperature" not in body and "max_tokens" not in body
        params = engine.added[-1][1]
        assert (params.temperature, params.top_p, params.max_new_tokens) == (0.0, 0.95, 9)


@pytest.mark.slow
def test_the_reply_is_fitted_into_the_context(browser):
    """max tokens above the room left is cut to exactly the room (the server would refuse it: 400), and a
    message too long for the context on its own is refused on the page with the sizes before anything is
    sent (dropping earlier turns cannot help), its message given back to shorten."""
    tok = tiny_tokenizer()
    full = [{"role": "user", "content": "What is 2 + 2? Let me think about this problem."}]
    ctx = _prompt_len(tok, full)
    short = [{"role": "user", "content": "hi"}]
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("four " * 50), max_seq_len=ctx)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        assert "context " + str(ctx) in browser.js(
            "(document.getElementById('model') || {}).textContent || ''"
        )
        _send_and_wait(browser, "hi")
        assert _last(browser, ".error") is None
        assert engine.added[-1][1].max_new_tokens == ctx - _prompt_len(tok, short)
        _send_and_wait(browser, full[0]["content"])
        assert _last(browser, ".error") == (
            f"Error: the message is {ctx} tokens; the model's context holds {ctx}: shorten it"
        )
        assert len(engine.added) == 1
        assert browser.js("document.getElementById('input').value") == full[0]["content"]


@pytest.mark.slow
def test_a_conversation_past_the_context_drops_its_oldest_turns(browser):
    """A conversation that outgrew the context was refused ("start a new chat"), losing the thread. As
    `nanoseek chat` does (fit_context), the page now sends it without its oldest whole exchanges, never the
    new message, and says so in a small note; the page still shows them. Where /tokenize cannot measure
    the prompt, the server's 400 context_length_exceeded has the page drop an exchange and ask again."""
    tok = tiny_tokenizer()
    asked = ["good morning", "hello there", "and what is the answer to this longer question?"]
    u = [{"role": "user", "content": q} for q in asked]
    a = {"role": "assistant", "content": "four"}
    room = len(tok.encode("four")) + 1  # max tokens: the last turn fits without the first, not with it
    ctx = _prompt_len(tok, [u[1], a, u[2]], thinking=False) + room
    assert _prompt_len(tok, [u[0], a, u[1], a, u[2]], thinking=False) + room > ctx
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("four"), max_seq_len=ctx)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        browser.js(f"document.getElementById('max-tokens').value = '{room}'")
        browser.js("document.getElementById('think').checked = false")
        _record_fetches(browser)
        for attempt in ("measured", "refused"):
            if attempt == "refused":  # a server that cannot measure: the page learns from its refusal
                browser.js("document.getElementById('clear').click()")
                browser.js(
                    "window.__sent = []; window.__fetch2 = window.fetch; window.fetch = function (url) {"
                    " return url === '/tokenize' ? Promise.resolve(new Response('{}', {status: 404}))"
                    " : window.__fetch2.apply(this, arguments); }; true"
                )
            for q in asked:
                _send_and_wait(browser, q)
                assert _last(browser, ".error") is None, (attempt, q)
            assert _chat_bodies(browser)[-1]["messages"] == [u[1], a, u[2]], attempt
            if attempt == "refused":  # the whole conversation was asked first
                assert _chat_bodies(browser)[-2]["messages"] == [u[0], a, u[1], a, u[2]]
            assert "morning" not in tok.decode(engine.added[-1][0])
            assert _last(browser, ".note") == "(context full: 1 earlier turn dropped from the model's view)"
            notes = browser.js("[...document.querySelectorAll('.note')].map(n => n.hidden)")
            assert notes == [True, True, False], attempt
            assert browser.js("document.querySelectorAll('.msg').length") == 6  # still shown, and kept
            assert len(json.loads(browser.js("localStorage.getItem('nanoseek:conversation')"))) == 6


@pytest.mark.slow
def test_errors_are_shown_as_text_and_the_failed_turn_is_not_sent_again(browser):
    """A refused request shows the server's message; a failure mid-stream (an in-band error event) shows
    its message as text, never as markup; the failed user message is not part of the next request, and it
    goes back into the message box (it was lost: the user had to type it again)."""
    tok = tiny_tokenizer()

    class BreakingEngine(ScriptedEngine):
        broken = False

        def step(self):
            if self.broken and self.tokens_generated >= 3:
                raise RuntimeError("<img src=x onerror=window.pwned=1>GPU fell over")
            return super().step()

    engine = BreakingEngine(
        tok, lambda prompt, params: tok.encode("The answer is four. " * 3), step_delay=0.01
    )
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        bad = {"model": "web-test", "messages": [{"role": "user", "content": "x"}], "temperature": 5}
        message = httpx.post(srv.url + "/v1/chat/completions", json=bad).json()["error"]["message"]
        browser.js("document.getElementById('temperature').value = '5'")
        _send_and_wait(browser, "first")
        assert _last(browser, ".error") == "Error: " + message
        assert not engine.added
        assert browser.js("document.getElementById('input').value") == "first"  # given back, to resend
        browser.js("document.getElementById('temperature').value = '0.6'")
        _send_and_wait(browser, "second")
        text = tok.decode(engine.added[-1][0])
        assert "second" in text and "first" not in text
        engine.broken = True
        _send_and_wait(browser, "third")
        assert (
            _last(browser, ".error")
            == "Error: engine failure: <img src=x onerror=window.pwned=1>GPU fell over"
        )
        assert browser.js("document.querySelectorAll('.msg img').length") == 0
        kept = json.loads(browser.js("localStorage.getItem('nanoseek:conversation')"))
        assert [m["content"] for m in kept if m["role"] == "user"] == ["second"]


@pytest.mark.slow
def test_stop_keeps_the_partial_answer_and_enter_sends_one_message_at_a_time(browser):
    """Stop aborts the generation and keeps what came (the next message is sent after it); Enter while an
    answer streams does not send a second request; Shift+Enter is a new line, not a send."""
    tok = tiny_tokenizer()
    engine = ScriptedEngine(
        tok, lambda prompt, params: tok.encode("Hmm.\n</think>\n\n" + "four " * 80), step_delay=0.05
    )

    def key(shift: bool) -> None:
        browser.js(
            "document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter',"
            f" shiftKey: {'true' if shift else 'false'}, bubbles: true, cancelable: true}}))"
        )

    with LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test"))) as srv:
        _open_page(browser, srv)
        browser.js("document.getElementById('input').value = 'first'")
        browser.js("document.getElementById('send').click()")
        _wait(lambda: "four" in (_last(browser, ".answer") or ""), "the answer never started")
        browser.js("document.getElementById('input').value = 'too soon'")
        key(shift=False)
        time.sleep(0.3)
        assert len(engine.added) == 1
        browser.js("document.getElementById('stop').click()")
        _wait(lambda: browser.js("document.getElementById('stop').disabled"), "stop did not end the turn")
        _wait(lambda: engine.aborted, "stop did not abort the generation")
        answer = _last(browser, ".answer")
        assert answer.endswith("(stopped)") and "four" in answer
        kept = json.loads(browser.js("localStorage.getItem('nanoseek:conversation')"))
        assert [m["role"] for m in kept] == ["user", "assistant"] and kept[1]["content"].startswith("four")
        browser.js("document.getElementById('input').value = 'next'")
        key(shift=True)
        time.sleep(0.3)
        assert len(engine.added) == 1
        key(shift=False)
        _wait(lambda: len(engine.added) == 2, "Enter did not send")
        text = tok.decode(engine.added[-1][0])
        assert "first" in text and kept[1]["content"].strip() in text and "next" in text


@pytest.mark.slow
def test_markdown_escapes_entities_and_attributes_and_drops_unsafe_links(browser):
    """The renderer escapes first: entities the model writes show as written, a quote cannot leave a link's
    href, only http(s)/mailto links are made, and code (fenced or inline) is shown verbatim."""
    with _markdown_renderer(browser) as render:
        assert render("a &lt;b&gt; &amp; c") == "<p>a &amp;lt;b&amp;gt; &amp;amp; c</p>"
        assert render('[x](https://a.com/"onmouseover="alert(1))') == (
            '<p><a href="https://a.com/&quot;onmouseover=&quot;alert(1)" target="_blank"'
            ' rel="noopener noreferrer">x</a></p>'
        )
        assert render("[x](javascript:alert(1))") == "<p>[x](javascript:alert(1))</p>"
        assert (
            render("```py\n**x** <b>\n```") == '<pre><code class="language-py">**x** &lt;b&gt;</code></pre>'
        )
        assert render("`*a*` and ## not a heading") == "<p><code>*a*</code> and ## not a heading</p>"
        assert render("## Title\n> quoted") == "<h2>Title</h2>\n<blockquote>quoted</blockquote>"


@pytest.mark.slow
def test_markup_that_reached_the_page_could_run_no_script_and_load_nothing_from_elsewhere(browser):
    """The renderer escapes model output first; the page's Content-Security-Policy is the wall behind it. The
    page had none: markup that reached it any way (an inline handler, an image of another site that carries
    the API key in its URL) ran and loaded. Now both are refused, and the page's own work (a streamed answer
    with an aligned table and a code block) trips nothing."""
    blocked = "window.__blocked"
    with _answering("| a | b |\n|:-:|--:|\n| 1 | 2 |\n\n```py\nx = 1\n```") as srv:
        _open_page(browser, srv)
        browser.js(
            "window.__blocked = []; document.addEventListener('securitypolicyviolation',"
            " e => window.__blocked.push(e.effectiveDirective)); true"
        )
        _send_and_wait(browser, "a table")
        assert browser.js("getComputedStyle(document.querySelector('.answer th')).textAlign") == "center"
        assert browser.js("document.querySelectorAll('.answer .code pre').length") == 1
        assert browser.js(blocked) == []
        browser.js(
            "document.querySelector('.answer').insertAdjacentHTML('beforeend', '<img src=\"/missing.png\""
            ' onerror="window.pwned = 1"><img src="http://127.0.0.2:9/k.png">\'); true'
        )
        _wait(lambda: browser.js("window.pwned") or len(browser.js(blocked)) >= 2, "the markup did nothing")
        assert browser.js("window.pwned") is None
        assert sorted(browser.js(blocked)) == ["img-src", "script-src-attr"]
        policy = httpx.get(srv.url + "/").headers["content-security-policy"]
        assert httpx.get(srv.url + "/static/index.html").headers["content-security-policy"] == policy


def _answering(answer: str, **engine_kw) -> LiveServer:
    """A live server whose every reply is `answer`, after an empty think block."""
    tok = tiny_tokenizer()
    engine = ScriptedEngine(
        tok, lambda prompt, params: tok.encode(f"ok\n</think>\n\n{answer}"), max_seq_len=4096, **engine_kw
    )
    return LiveServer(create_app(engine, tok, ServeConfig(model_name="web-test")))


@pytest.mark.slow
def test_a_long_word_wraps_in_its_message_and_the_page_follows_a_dark_system_theme(browser):
    """A long URL or hash (no spaces) ran out of its card and gave the whole page a sideways scroll on a
    phone; code blocks alone scroll. The page was light under a dark system theme (ollama's and llama.cpp's
    pages follow prefers-color-scheme)."""
    url = "https://example.com/" + "abcdefghij" * 15
    with _answering(f"See {url}\n\n```\n{'x = 1; ' * 40}\n```") as srv:
        browser.call(
            "Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=1, mobile=True
        )
        _open_page(browser, srv)
        _send_and_wait(browser, "sha " + "0123456789abcdef" * 8)
        sizes = browser.js("(m => [m.scrollWidth, m.clientWidth])(document.getElementById('messages'))")
        assert sizes[0] <= sizes[1], f"the page scrolls sideways: {sizes}"
        assert browser.js("(p => p.scrollWidth > p.clientWidth)(document.querySelector('.answer pre'))")

        def luminance(selector: str, prop: str) -> float:
            rgb = browser.js(f"getComputedStyle(document.querySelector('{selector}')).{prop}")
            return sum(int(c) for c in re.findall(r"\d+", rgb)[:3]) / 3

        assert luminance("body", "backgroundColor") > 200
        browser.call(
            "Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}]
        )
        for selector in ("body", ".msg.user", ".msg.assistant", "textarea"):
            assert luminance(selector, "backgroundColor") < 60, selector
        for selector in ("body", ".msg.assistant .answer", "textarea"):
            assert luminance(selector, "color") > 180, selector


def _scroll_probes(browser) -> tuple:
    """(at_bottom(), height()) of the page's message list, for the scroll-following tests."""

    def at_bottom() -> bool:
        return browser.js(
            "(m => m.scrollHeight - m.scrollTop - m.clientHeight < 5)(document.getElementById('messages'))"
        )

    def height() -> int:
        return browser.js("document.getElementById('messages').scrollHeight")

    return at_bottom, height


@pytest.mark.slow
def test_scrolling_up_while_an_answer_streams_keeps_the_readers_place(browser):
    """Each token scrolled the page to the bottom, so a reader who scrolled up to an earlier part of a long
    answer was pulled back down at once. The view follows new tokens only while it is at the bottom (as
    llama.cpp's page does), again once the reader returns there, and always for a new message."""
    server = _answering("\n\n".join(f"line {i}" for i in range(150)), step_delay=0.03)

    at_bottom, height = _scroll_probes(browser)

    with server as srv:
        browser.call(
            "Emulation.setDeviceMetricsOverride", width=800, height=500, deviceScaleFactor=1, mobile=False
        )
        _open_page(browser, srv)
        browser.js("document.getElementById('max-tokens').value = '1000'")
        browser.js("document.getElementById('input').value = 'count'")
        browser.js("document.getElementById('send').click()")
        _wait(lambda: "line 20" in (_last(browser, ".answer") or ""), "the answer never got long")
        assert at_bottom()
        browser.js("document.getElementById('messages').scrollTop = 50")
        time.sleep(0.3)  # the scroll event is delivered with the next frame
        grown = height()
        _wait(lambda: height() > grown + 200, "the answer stopped growing")
        assert browser.js("document.getElementById('messages').scrollTop") == 50  # left where the reader is
        browser.js("(m => { m.scrollTop = m.scrollHeight; })(document.getElementById('messages'))")
        time.sleep(0.3)
        grown = height()
        _wait(lambda: height() > grown + 200, "the answer stopped growing")
        assert at_bottom()  # back at the bottom: following again
        browser.js("document.getElementById('stop').click()")
        _wait(lambda: browser.js("document.getElementById('stop').disabled"), "stop did not end the turn")
        browser.js("document.getElementById('messages').scrollTop = 0")
        time.sleep(0.3)
        browser.js("document.getElementById('max-tokens').value = '30'")
        _send_and_wait(browser, "again")
        assert at_bottom()  # a new message brings the view down


@pytest.mark.slow
def test_a_taller_window_while_an_answer_streams_keeps_following_it(browser):
    """A window made taller (a phone turned upright, a window maximized) moves the view up itself, to
    the new bottom: the page took that for a reader who had scrolled up and stopped following the answer
    for the rest of the turn, where the browser has no scroll anchoring to hide it (Safari)."""
    server = _answering("\n\n".join(f"line {i}" for i in range(150)), step_delay=0.03)

    at_bottom, height = _scroll_probes(browser)

    def window(h: int) -> None:
        browser.call(
            "Emulation.setDeviceMetricsOverride", width=800, height=h, deviceScaleFactor=1, mobile=False
        )

    with server as srv:
        window(500)
        _open_page(browser, srv)
        browser.js(
            "document.head.insertAdjacentHTML('beforeend', '<style>main { overflow-anchor: none }</style>')"
        )
        browser.js("document.getElementById('max-tokens').value = '1000'")
        browser.js("document.getElementById('input').value = 'count'")
        browser.js("document.getElementById('send').click()")
        _wait(lambda: "line 20" in (_last(browser, ".answer") or ""), "the answer never got long")
        assert at_bottom()
        window(800)
        time.sleep(0.3)
        grown = height()
        _wait(lambda: height() > grown + 200, "the answer stopped growing")
        assert at_bottom()  # still following


@pytest.mark.slow
def test_a_code_block_has_a_copy_button_that_copies_the_code_alone(browser):
    """A code block had no way to copy it but selecting by hand, awkward for one that scrolls sideways
    (llama.cpp's page puts a copy button on each). The button copies the code verbatim, and is there on
    a reloaded conversation too."""
    code = "def f(x):\n    return x < 1 and '**a**'  # " + "long_" * 30
    with _answering(f"Here:\n\n```python\n{code}\n```\n\nDone.") as srv:
        _open_page(browser, srv)
        _send_and_wait(browser, "code please")
        for _ in range(2):  # the streamed answer, then the same answer restored after a reload
            browser.js(
                "window.__copied = null; navigator.clipboard.writeText ="
                " t => { window.__copied = t; return Promise.resolve(); }; true"
            )
            button = "document.querySelector('.msg.assistant .answer button.copy')"
            assert browser.js(f"{button}.getAttribute('aria-label')") == "Copy code"
            browser.js(f"{button}.click()")
            _wait(lambda: browser.js("window.__copied") is not None, "nothing was copied")
            assert browser.js("window.__copied") == code
            assert browser.js(f"{button}.textContent") == "Copied"
            browser.call("Page.reload")
            _wait(
                lambda: (
                    browser.js("document.readyState") == "complete"
                    and browser.js("document.querySelectorAll('.msg').length") == 2
                ),
                "conversation not restored",
            )
        # a clipboard the browser refuses (no permission): the selection's copy, focus kept on the button
        browser.js(
            "window.__copied = null; navigator.clipboard.writeText = t => Promise.reject(new Error('denied'));"
            " document.execCommand = c => { window.__copied = document.activeElement.value; return true; }; true"
        )
        browser.js(f"{button}.focus(); {button}.click(); true")
        _wait(lambda: browser.js("window.__copied") is not None, "the fallback copied nothing")
        assert browser.js("window.__copied") == code
        _wait(lambda: browser.js(f"{button}.textContent") == "Copied", "the fallback's copy was not reported")
        assert browser.js("document.activeElement.classList.contains('copy')")


@pytest.mark.slow
def test_copy_works_while_the_answer_streams(browser):
    """The answer was rebuilt from its markdown on each token, Copy buttons included: a click on Copy
    under a code block, while the answer streamed, was lost (the button pressed was gone by the release).
    Blocks that did not change now stay, and a code block still growing keeps its box and button."""
    code = "print('hi')\n" + "x = 1\n" * 12 + "y = 2"
    with _answering(f"```python\n{code}\n```\n\n" + "more " * 30, step_delay=0.02) as srv:
        browser.call(
            "Emulation.setDeviceMetricsOverride", width=1280, height=2000, deviceScaleFactor=1, mobile=False
        )
        _open_page(browser, srv)
        browser.js(
            "window.__copied = null; navigator.clipboard.writeText ="
            " t => { window.__copied = t; return Promise.resolve(); }; true"
        )
        browser.js("document.getElementById('input').value = 'code please'")
        browser.js("document.getElementById('send').click()")
        button = "document.querySelector('.msg.assistant .answer button.copy')"
        _wait(lambda: browser.js(f"!!{button}"), "no code block")
        browser.js(f"window.__button = {button}; true")  # while the code still grows
        _wait(lambda: "more" in (_last(browser, ".answer") or ""), "the text after the code never came")
        assert browser.js(f"window.__button === {button}"), "the code block's button was rebuilt"
        x, y = browser.js(f"(r => [r.x + r.width / 2, r.y + r.height / 2])({button}.getBoundingClientRect())")
        browser.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        time.sleep(0.2)  # tokens arrive between the press and the release
        browser.call("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", clickCount=1)
        assert browser.js("document.querySelector('.msg.assistant').dataset.state") == "streaming"
        _wait(lambda: browser.js("window.__copied") is not None, "the click on Copy was lost", timeout=5)
        assert browser.js("window.__copied") == code
        assert browser.js(f"{button}.textContent") == "Copied"
        browser.js("document.getElementById('stop').click()")


@pytest.mark.slow
def test_markdown_tables_render_and_their_cells_are_text(browser):
    """A model's GitHub-style table showed as rows of pipes. It renders as a table (alignment from the
    delimiter row, "\\|" a pipe in a cell), and markup in a cell is shown as text, never run."""
    with _markdown_renderer(browser) as render:
        assert render("| a | b |\n|:--|--:|\n| `x\\|y` | <img src=x onerror=alert(1)> |\n| **c** |") == (
            '<table><thead><tr><th style="text-align:left">a</th><th style="text-align:right">b</th></tr>'
            '</thead><tbody><tr><td style="text-align:left"><code>x|y</code></td><td style="text-align:right">'
            '&lt;img src=x onerror=alert(1)&gt;</td></tr><tr><td style="text-align:left"><strong>c</strong>'
            '</td><td style="text-align:right"></td></tr></tbody></table>'
        )
        assert render("x | y\n--- | :-:\n<script>alert(1)</script> | 2") == (
            '<table><thead><tr><th>x</th><th style="text-align:center">y</th></tr></thead><tbody><tr>'
            '<td>&lt;script&gt;alert(1)&lt;/script&gt;</td><td style="text-align:center">2</td></tr></tbody></table>'
        )
        # not a table: a delimiter row of another width, or no pipe in it
        assert render("| a |\n|---|---|") == "<p>| a |<br>|---|---|</p>"
        assert render("a | b\n---") == "<p>a | b<br>---</p>"


@pytest.mark.slow
def test_a_wide_table_scrolls_by_itself_and_the_page_fits_a_phones_visible_height(browser):
    """On a phone the page was 100vh tall, the height with the browser's bar hidden, so the message box sat
    under the bar; it is the dynamic viewport's height (100dvh), with 100vh where dvh is unknown. A wide
    table scrolls in its message instead of widening the page, in both themes."""
    row = "| " + " | ".join(f"column {k}" for k in range(12)) + " |"
    table = row + "\n|" + "---|" * 12 + "\n" + row.replace("column", "<script>window.pwned=1</script>")
    with _answering(table) as srv:
        browser.call(
            "Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=1, mobile=True
        )
        _open_page(browser, srv)
        heights = browser.js(
            "[...document.styleSheets[0].cssRules].filter(r => r.selectorText === 'body')"
            ".map(r => r.style.height)"
        )
        assert heights == ["100dvh"], heights
        _send_and_wait(browser, "a table please")
        assert browser.js("document.querySelectorAll('.msg.assistant table td').length") == 12
        assert browser.js("window.pwned") is None
        for theme in ("light", "dark"):
            browser.call(
                "Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": theme}]
            )
            sizes = browser.js("(m => [m.scrollWidth, m.clientWidth])(document.getElementById('messages'))")
            assert sizes[0] <= sizes[1], f"the page scrolls sideways: {sizes}"
            assert browser.js("(t => t.scrollWidth > t.clientWidth)(document.querySelector('.answer table'))")
            bottom = browser.js("document.getElementById('composer').getBoundingClientRect().bottom")
            assert bottom <= browser.js("window.innerHeight")


@pytest.mark.slow
def test_a_screen_reader_waits_for_the_streamed_turn(browser):
    """The message list is a live region, and every token re-rendered the answer in it, so a screen reader
    read the reply out over and over as it grew. While a reply streams the region is aria-busy (WAI-ARIA
    1.2), and no longer once the turn is done or stopped."""
    with _answering("four " * 40, step_delay=0.03) as srv:
        _open_page(browser, srv)
        busy = "document.getElementById('messages').getAttribute('aria-busy')"
        assert browser.js(busy) != "true"
        browser.js("document.getElementById('input').value = 'count'")
        browser.js("document.getElementById('send').click()")
        _wait(lambda: "four" in (_last(browser, ".answer") or ""), "the answer never started")
        assert browser.js(busy) == "true"
        browser.js("document.getElementById('stop').click()")
        _wait(lambda: browser.js("document.getElementById('stop').disabled"), "stop did not end the turn")
        assert browser.js(busy) == "false"
        _send_and_wait(browser, "again")
        assert browser.js(busy) == "false"


@pytest.mark.slow
def test_a_server_with_a_key_asks_for_it_in_the_page(browser):
    """With --api-key the page showed the server's 401 text, "send 'Authorization: Bearer <key>'", a
    header a browser user does not set; the README says the page asks for the key in its API key box. The
    page now says so, and puts the cursor there; a wrong key is told apart from a missing one."""
    server, engine = _keyed_server()
    with server as srv:
        _navigate(browser, srv)
        model = "(document.getElementById('model') || {}).textContent || ''"
        _wait(lambda: "?" in browser.js(model), "the page did not load")
        assert browser.js(model) == "model: ? (this server needs an API key: enter it in the API key box)"
        assert browser.js("document.activeElement.id") == "api-key"
        _send_and_wait(browser, "hello")
        assert _last(browser, ".error") == "Error: this server needs an API key: enter it in the API key box"
        browser.js("document.getElementById('api-key').value = 'wrong'")
        _send_and_wait(browser, "hello")
        assert _last(browser, ".error") == "Error: wrong API key: enter it in the API key box"
        assert browser.js("document.activeElement.id") == "api-key"
        assert not engine.added
        browser.js("document.getElementById('api-key').value = 's3cret'")
        browser.js("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        _wait(lambda: "web-test" in browser.js(model), "the key did not reach /v1/models")
        _send_and_wait(browser, "hello")
        assert len(engine.added) == 1
        assert (
            browser.js("[...document.querySelectorAll('.msg.assistant')].pop().querySelector('.error')")
            is None
        )
