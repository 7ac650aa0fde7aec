// The chat page: keeps the conversation, streams replies from /v1/chat/completions over SSE, and shows
// DeepSeek's reasoning_content in a collapsible block apart from the answer. No build step, no deps.
"use strict";
(function () {
  const $ = function (id) { return document.getElementById(id); };
  const messagesEl = $("messages"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
  // The conversation, kept across reloads in localStorage: {role, content, reasoning?}. Only role and
  // content are sent back; reasoning stays on the page (R1's template drops it from history anyway).
  const STORE = "nanoseek:conversation";
  const history = [];
  function save() { try { localStorage.setItem(STORE, JSON.stringify(history)); } catch (e) { /* full */ } }
  function wire() { return history.map(function (m) { return { role: m.role, content: m.content }; }); }
  let model = null, maxModelLen = null, controller = null;
  // Bumped by "New chat": a turn still winding up from an older conversation must not write into this one.
  let conversation = 0;
  // Messages before history[skip] have left the model's view: the context was full (the page still shows them).
  let skip = 0;

  for (const id of ["temperature", "max-tokens", "api-key"]) {
    const saved = localStorage.getItem("nanoseek:" + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", function () { localStorage.setItem("nanoseek:" + id, $(id).value); });
  }
  const think = $("think");
  think.checked = localStorage.getItem("nanoseek:think") !== "false";
  think.addEventListener("change", function () { localStorage.setItem("nanoseek:think", String(think.checked)); });
  // the same rendering for /tokenize's count and the request itself, so the reply's room is exact
  function templateKwargs() { return { thinking: think.checked }; }
  // Tokens of the prompt history[start:] makes, as the request renders it (null: the server would not say).
  async function promptTokens(start) {
    const t = await fetch("/tokenize", { method: "POST", headers: headers(), body: JSON.stringify({ messages: wire().slice(start), chat_template_kwargs: templateKwargs() }) });
    return t.ok ? (await t.json()).count : null;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // Why the server refused a request. Its 401 names an HTTP header, which a browser user does not set: the
  // page asks for the key in its own box instead.
  function refusal(r, body) {
    if (r.status === 401) {
      $("api-key").focus();
      const given = $("api-key").value.trim();
      return new Error((given ? "wrong API key" : "this server needs an API key") + ": enter it in the API key box");
    }
    return new Error(body.error ? body.error.message : r.status + " " + r.statusText);
  }

  async function loadModel() {
    try {
      const r = await fetch("/v1/models", { headers: headers() });
      const body = await r.json();
      if (!r.ok) throw refusal(r, body);
      model = body.data[0].id;
      maxModelLen = body.data[0].max_model_len || null;
      $("model").textContent = "model: " + model + (maxModelLen ? " (context " + maxModelLen + ")" : "");
    } catch (e) {
      $("model").textContent = "model: ? (" + e.message + ")";
    }
  }

  function addMessage(role) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role;
    div.appendChild(label);
    messagesEl.appendChild(div);
    return div;
  }

  // Follow new tokens only while the reader is at the bottom: one who scrolled up to read an earlier part
  // keeps their place (as llama.cpp's and ChatGPT's pages do); sending a message follows again.
  // The scroll event comes with the next frame: a token rendered before it would pull a reader who moved
  // up back down (or leave one who came back behind), so each render also reads where the view is now
  // against where the page last put it and how tall the list was.
  let follow = true;
  let placed = null;  // where the page last put the view
  let height = 0;  // the list's height at the last render
  messagesEl.addEventListener("scroll", function () {
    follow = messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 40;
  });
  function scroll(force) {
    const top = messagesEl.scrollTop;
    // A taller window (a phone turned upright) or a shorter list moves the view up by itself, to the
    // lowest it can be now: the reader did not (without scroll anchoring, Safari, it stopped following)
    const lowest = messagesEl.scrollHeight - messagesEl.clientHeight;
    if (force) follow = true;
    else if (placed !== null && top < Math.min(placed, lowest) - 5) follow = false;  // moved up since
    else if (height && top + messagesEl.clientHeight >= height - 40) follow = true;  // at the last bottom
    if (follow) {
      messagesEl.scrollTop = messagesEl.scrollHeight;
      placed = messagesEl.scrollTop;
    }
    height = messagesEl.scrollHeight;
  }

  function assistantView(div) {
    const note = document.createElement("div");
    note.className = "note";
    note.hidden = true;
    const details = document.createElement("details");
    details.className = "thinking";
    details.open = true;
    details.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking…";
    const reasoning = document.createElement("div");
    reasoning.className = "reasoning";
    details.append(summary, reasoning);
    const answer = document.createElement("div");
    answer.className = "answer";
    const meta = document.createElement("div");
    meta.className = "meta";
    div.append(note, details, answer, meta);
    return { note: note, details: details, summary: summary, reasoning: reasoning, answer: answer, meta: meta };
  }

  // The answer's markdown, with a Copy button on each code block (as llama.cpp's page has: a block that
  // scrolls sideways is awkward to select by hand). While an answer streams it is rendered again on each
  // token: only the blocks that changed are replaced, and a code block still growing keeps its box and
  // button, else a click on Copy (or a selection) whose press and release straddle a token was lost.
  const rendered = new WeakMap();  // a block on the page -> the HTML it shows
  function showAnswer(el, content) {
    const fresh = document.createElement("div");
    fresh.innerHTML = window.renderMarkdown(content);
    const blocks = Array.from(fresh.children);
    blocks.forEach(function (block, i) {
      const html = block.outerHTML, old = el.children[i];
      if (old && rendered.get(old) === html) return;
      let shown = block;
      if (block.tagName === "PRE") {
        if (old && old.className === "code") {
          old.querySelector("pre").replaceWith(block);
          rendered.set(old, html);
          return;
        }
        shown = document.createElement("div");
        shown.className = "code";
        const copy = document.createElement("button");
        copy.type = "button";
        copy.className = "copy secondary";
        copy.textContent = "Copy";
        copy.setAttribute("aria-label", "Copy code");
        shown.append(copy, block);
      }
      rendered.set(shown, html);
      if (old) old.replaceWith(shown); else el.appendChild(shown);
    });
    while (el.children.length > blocks.length) el.lastElementChild.remove();
  }

  // navigator.clipboard exists only in a secure context (https, localhost), and a browser may still refuse
  // it (no permission): a page opened at http://<lan address>, or refused, copies through a selection.
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return copyBySelection(text); });
    }
    return copyBySelection(text);
  }

  function copyBySelection(text) {
    const focused = document.activeElement;
    const area = document.createElement("textarea");
    area.value = text;
    area.style.position = "fixed"; area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (focused && focused.focus) focused.focus();  // a keyboard user stays on the button
    return ok ? Promise.resolve() : Promise.reject(new Error("the browser refused to copy"));
  }

  messagesEl.addEventListener("click", function (e) {
    const copy = e.target.closest("button.copy");
    if (!copy) return;
    copyText(copy.parentNode.querySelector("code").textContent).then(
      function () { copy.textContent = "Copied"; },
      function () { copy.textContent = "Copy failed"; });
    setTimeout(function () { copy.textContent = "Copy"; }, 1500);
  });

  // Parse an SSE byte stream into JSON payloads; yields until "data: [DONE]".
  async function* sse(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  async function send(text) {
    history.push({ role: "user", content: text });
    addMessage("user").appendChild(document.createTextNode(text));
    const div = addMessage("assistant");
    div.dataset.state = "streaming";
    // The page is a live region: without aria-busy a screen reader reads out every token's re-render; busy,
    // it waits and reads the finished turn (WAI-ARIA 1.2, aria-busy).
    messagesEl.setAttribute("aria-busy", "true");
    const view = assistantView(div);
    scroll(true);
    let reasoning = "", content = "", usage = null, finish = null, failed = false;
    const started = performance.now();
    let thought = null;  // seconds until the answer began: "Thought for" is the thinking, not the whole turn
    const mine = conversation;
    controller = new AbortController();
    sendBtn.disabled = true; stopBtn.disabled = false;
    try {
      // an empty box sends none: the server's default, the checkpoint's generation_config.json
      // max_new_tokens within the room the context leaves (NaN here)
      let maxTokens = parseInt($("max-tokens").value, 10);
      let start = skip;  // the first message sent
      const before = skip;
      if (maxModelLen) {
        // Fit the prompt and the reply into the context (the server refuses, 400, a request that cannot):
        // as `nanoseek chat` does (fit_context), the oldest whole exchanges leave the model's view, never
        // the new message, while the prompt and room for the reply (at most half the context) do not fit.
        const half = Math.floor(maxModelLen / 2);
        const reserve = isNaN(maxTokens) ? half : Math.min(maxTokens, half);
        let count = await promptTokens(start);
        while (count !== null && count + reserve > maxModelLen && start + 2 < history.length) {
          start += 2;  // an exchange: a user message and the reply to it
          count = await promptTokens(start);
        }
        if (count !== null) {
          if (count >= maxModelLen) {  // a message too long on its own is not helped by dropping turns
            throw new Error("the message is " + count + " tokens; the model's context holds " + maxModelLen + ": shorten it");
          }
          if (!isNaN(maxTokens)) maxTokens = Math.min(maxTokens, maxModelLen - count);
        }
      }
      let r;
      for (;;) {
        const body = {
          messages: wire().slice(start),
          stream: true,
          stream_options: { include_usage: true },
          chat_template_kwargs: templateKwargs(),
        };
        if (!isNaN(maxTokens)) body.max_tokens = maxTokens;
        // an empty box sends none: the server's default, the checkpoint's generation_config.json (greedy
        // for nanoseek's own checkpoints, R1's 0.6), as chat, generate and the API sample it
        const temperature = parseFloat($("temperature").value);
        if (!isNaN(temperature)) body.temperature = temperature;
        if (model) body.model = model;
        r = await fetch("/v1/chat/completions", {
          method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
        });
        if (r.ok) break;
        const refused = await r.json().catch(function () { return {}; });
        // a context the page could not measure (no /tokenize, no max_model_len): drop the oldest exchange
        // and ask again, as long as there is one before the new message
        if (r.status === 400 && refused.error && refused.error.code === "context_length_exceeded" && start + 2 < history.length) {
          start += 2;
          continue;
        }
        throw refusal(r, refused);
      }
      if (mine === conversation && start > before) {
        skip = start;
        const dropped = (start - before) / 2;
        view.note.textContent = "(context full: " + dropped + " earlier turn" + (dropped === 1 ? "" : "s") + " dropped from the model's view)";
        view.note.hidden = false;
      }
      for await (const chunk of sse(r)) {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const d = choice.delta || {};
          if (d.reasoning_content) {
            reasoning += d.reasoning_content;
            view.details.hidden = false;
            view.reasoning.textContent = reasoning;
          }
          if (d.content) {
            if (reasoning && thought === null) thought = (performance.now() - started) / 1000;
            content += d.content;
            showAnswer(view.answer, content);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        scroll();
      }
    } catch (e) {
      failed = e.name !== "AbortError";
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = e.name === "AbortError" ? "(stopped)" : "Error: " + e.message;
      view.answer.appendChild(p);
    } finally {
      const secs = (performance.now() - started) / 1000;
      if (reasoning) { view.summary.textContent = "Thought for " + (thought ?? secs).toFixed(1) + " s"; view.details.open = false; }
      const parts = [];
      if (usage) parts.push(usage.completion_tokens + " tokens", (usage.completion_tokens / secs).toFixed(1) + " tok/s");
      if (finish) parts.push("finish: " + finish);
      view.meta.textContent = parts.join(" · ");
      // A failed turn leaves the history as it was, so the next message is not sent after a broken one.
      if (mine === conversation) {  // else "New chat" has cleared the history this turn belonged to
        if (failed) {
          history.pop();
          // ...and the message goes back into the box, to edit (a prompt too long: shorten it) and resend
          if (!input.value) input.value = text;
        }
        else history.push({ role: "assistant", content: content, reasoning: reasoning });
        save();
      }
      div.dataset.state = "done";
      messagesEl.setAttribute("aria-busy", "false");
      sendBtn.disabled = false; stopBtn.disabled = true;
      controller = null;
      scroll();
    }
  }

  $("composer").addEventListener("submit", function (e) {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", function (e) {
    // An input method (Chinese, Japanese, ...) confirms its candidate with Enter: that one is not a send.
    if (e.isComposing || e.keyCode === 229) return;
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  stopBtn.addEventListener("click", function () { if (controller) controller.abort(); });
  $("clear").addEventListener("click", function () {
    if (controller) controller.abort();
    conversation++;
    history.length = 0;
    skip = 0;
    save();
    messagesEl.textContent = "";
  });
  $("api-key").addEventListener("change", loadModel);

  // Restore the kept conversation.
  try {
    for (const m of JSON.parse(localStorage.getItem(STORE) || "[]")) {
      if (!m || (m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") continue;
      history.push(m);
      const div = addMessage(m.role);
      if (m.role === "user") { div.appendChild(document.createTextNode(m.content)); continue; }
      div.dataset.state = "done";
      const view = assistantView(div);
      if (m.reasoning) {
        view.details.hidden = false; view.details.open = false;
        view.summary.textContent = "Thinking"; view.reasoning.textContent = m.reasoning;
      }
      showAnswer(view.answer, m.content);
    }
  } catch (e) { localStorage.removeItem(STORE); }
  scroll(true);
  loadModel();
})();
