// A small, safe markdown renderer: HTML is escaped FIRST, then a few constructs are turned into tags,
// so model output can never inject markup or script. Handles fenced code, inline code, headings,
// bold/italic, lists, block quotes, GitHub tables, links (http/https/mailto only) and paragraphs.
"use strict";
(function (global) {
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
            .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // Emphasis on already-escaped text that holds no tags of ours (they are cut out first). As in CommonMark,
  // a delimiter opens only before a non-space and closes only after one: "2 * 3 * 4" is a product, not emphasis.
  // "_" never inside a word of any script: JavaScript's \W holds every non-ASCII letter, and "報告書_2024_最終版"
  // lost its underscores to <em>.
  function emphasis(text) {
    text = text.replace(/\*\*(?!\s)([^*\n]*[^*\s])\*\*/g, "<strong>$1</strong>")
               .replace(/__(?!\s)([^_\n]*[^_\s])__/g, "<strong>$1</strong>");
    return text.replace(/(^|[^*])\*(?!\s)([^*\n]*[^*\s])\*/g, "$1<em>$2</em>")
               .replace(/(^|[^\p{L}\p{M}\p{N}_])_(?!\s)([^_\n]*[^_\s])_(?=[^\p{L}\p{M}\p{N}_]|$)/gu, "$1<em>$2</em>");
  }

  // Inline spans on already-escaped text. Code spans and links are cut out into NUL-delimited
  // placeholders first, so emphasis never reaches into a code span or a link's href/attributes.
  function inline(text) {
    const held = [], typed = [];
    function hold(html, as) { held.push(html); typed.push(as); return "\u0000" + (held.length - 1) + "\u0000"; }
    text = text.replace(/`([^`\n]+)`/g, function (m, c) { return hold("<code>" + c + "</code>", m); });
    // a URL may hold balanced parentheses, as Wikipedia's do: https://en.wikipedia.org/wiki/Set_(mathematics)
    text = text.replace(/\[([^\]\n]+)\]\(((?:[^()\s]|\([^()\s]*\))+)\)/g, function (m, label, url) {
      // backticks in a URL are its characters, not a code span: the link pointed at "<code>..." before
      url = url.replace(/\u0000(\d+)\u0000/g, function (_, i) { return typed[+i]; });
      const raw = url.replace(/&amp;/g, "&");
      if (!/^(https?:\/\/|mailto:)/i.test(raw)) return m;
      return hold('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + emphasis(label) + "</a>");
    });
    text = emphasis(text);
    const restore = function (s) { return s.replace(/\u0000(\d+)\u0000/g, function (_, i) { return restore(held[+i]); }); };
    return restore(text);
  }

  // A GitHub table's row split into its cells: outer pipes are optional, and "\\|" is a pipe inside a cell,
  // set aside as a NUL (the model's own are dropped) rather than told apart by a lookbehind: Safari before
  // 16.4 refuses a whole script over one, and no answer rendered there.
  function cells(line) {
    return line.trim().replace(/\\\|/g, "\u0000").replace(/^\|/, "").replace(/\|$/, "").split("|")
               .map(function (c) { return c.trim().replace(/\u0000/g, "|"); });
  }
  const delimiterRow = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function render(src) {
    // NUL delimits inline placeholders: the model's own NULs are dropped so none can name one.
    const lines = escapeHtml(src.replace(/\u0000/g, "")).split("\n");
    const out = [];
    let para = [], list = null, i = 0;
    function flushPara() { if (para.length) { out.push("<p>" + inline(para.join("<br>")) + "</p>"); para = []; } }
    // an ordered list keeps its first number: items parted by blank lines or text ("1. a\n\n2. b") are
    // separate lists here, and each would otherwise restart at 1
    function flushList() { if (list) { out.push("<" + list.tag + (list.start !== 1 ? ' start="' + list.start + '"' : "") + ">" + list.items.map(function (x) { return "<li>" + inline(x) + "</li>"; }).join("") + "</" + list.tag + ">"); list = null; } }
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushPara(); flushList();
        const body = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
        i++; // closing fence (or end of a still-streaming block)
        const cls = fence[1] ? ' class="language-' + fence[1] + '"' : "";
        out.push("<pre><code" + cls + ">" + body.join("\n") + "</code></pre>");
        continue;
      }
      // a table: a header row, then a delimiter row of as many cells ("|---|:-:|"), then its rows
      if (line.includes("|") && i + 1 < lines.length && lines[i + 1].includes("|") && delimiterRow.test(lines[i + 1])
          && cells(lines[i + 1]).length === cells(line).length) {
        flushPara(); flushList();
        const align = cells(lines[i + 1]).map(function (d) {
          const a = d.startsWith(":") ? (d.endsWith(":") ? "center" : "left") : (d.endsWith(":") ? "right" : "");
          return a ? ' style="text-align:' + a + '"' : "";
        });
        const row = function (line, tag) {
          const c = cells(line);
          return "<tr>" + align.map(function (a, k) { return "<" + tag + a + ">" + inline(c[k] || "") + "</" + tag + ">"; }).join("") + "</tr>";
        };
        const body = [];
        const head = row(line, "th");
        i += 2;
        while (i < lines.length && lines[i].includes("|") && !/^\s*$/.test(lines[i])) body.push(row(lines[i++], "td"));
        out.push("<table><thead>" + head + "</thead>" + (body.length ? "<tbody>" + body.join("") + "</tbody>" : "") + "</table>");
        continue;
      }
      const h = line.match(/^(#{1,6})\s+(.*)$/);
      const item = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/);  // [1]: an ordered item's number
      const quote = line.match(/^&gt;\s?(.*)$/);
      if (h) { flushPara(); flushList(); out.push("<h" + h[1].length + ">" + inline(h[2]) + "</h" + h[1].length + ">"); }
      else if (item) {
        flushPara();
        const tag = item[1] === undefined ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag: tag, items: [], start: tag === "ol" ? +item[1] : 1 }; }
        list.items.push(item[2]);
      }
      else if (quote) { flushPara(); flushList(); out.push("<blockquote>" + inline(quote[1]) + "</blockquote>"); }
      else if (/^\s*$/.test(line)) { flushPara(); flushList(); }
      else { flushList(); para.push(line); }
      i++;
    }
    flushPara(); flushList();
    return out.join("\n");
  }

  global.renderMarkdown = render;
  global.escapeHtml = escapeHtml;
})(window);
