"""The ledger page's style sheet and script (served by :mod:`orchestrator.serve`)."""

from __future__ import annotations

#: The page's style sheet.
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
code, pre { font-family: ui-monospace, monospace; }
pre { background: #f6f6f6; padding: .6em; white-space: pre-wrap; }
table.tasks td, table.tasks th { padding: .2em .8em; text-align: left; }
.acct { display: grid; grid-template-columns: 22em 16em 1fr; gap: .6em; align-items: center;
        margin: .15em 0; }
.acct .name { font-family: ui-monospace, monospace; overflow: hidden; text-overflow: ellipsis; }
.bar { position: relative; height: 12px; background: #eee; border-radius: 3px; overflow: hidden; }
.bar .spent { position: absolute; left: 0; top: 0; bottom: 0; background: #3a7bd5; }
.bar .reserved { position: absolute; top: 0; bottom: 0; background: #f0b429; }
.closed .name { color: #888; }
#events { font-family: ui-monospace, monospace; font-size: 12px; max-height: 30em;
          overflow: auto; }
#status.final { color: #0a7d32; }
"""

#: The page's script: it renders the stream with ``textContent`` only, never as markup.
SCRIPT = r"""
(function () {
  "use strict";
  var body = document.body, task = body.dataset.task, token = body.dataset.token;
  if (!task) { return; }
  var q = token ? "?token=" + encodeURIComponent(token) : "";
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function num(n) { return n === null || n === undefined ? "\u221e" : n.toLocaleString("en"); }
  function render(acct, depth, into) {
    var total = acct.total_spent_tokens, held = acct.total_reserved_tokens;
    var row = el("div", "acct" + (acct.closed ? " closed" : ""));
    row.dataset.account = acct.path;
    var name = el("span", "name", "\u00a0".repeat(depth * 2) + acct.path.split("/").pop());
    name.title = acct.path;
    row.appendChild(name);
    row.appendChild(el("span", "nums",
      num(total) + " spent, " + num(held) + " held / " + num(acct.limit_tokens) + " tok"));
    var bar = el("div", "bar"), limit = acct.limit_tokens || Math.max(total + held, 1);
    var spent = el("div", "spent"), reserved = el("div", "reserved");
    var sp = Math.min(100, 100 * total / limit), rp = Math.min(100 - sp, 100 * held / limit);
    spent.style.width = sp + "%";
    reserved.style.left = sp + "%";
    reserved.style.width = rp + "%";
    bar.dataset.spent = String(total);
    bar.dataset.reserved = String(held);
    bar.appendChild(spent); bar.appendChild(reserved); row.appendChild(bar);
    into.appendChild(row);
    acct.children.forEach(function (c) { render(c, depth + 1, into); });
  }
  var stream = new EventSource("/api/tasks/" + encodeURIComponent(task) + "/stream" + q);
  stream.addEventListener("ledger", function (m) {
    var ev = JSON.parse(m.data), tags = ev.tags || {}, extra = ev.extra || {};
    var when = new Date(parseInt(ev.id.split("-")[0], 10)).toISOString().slice(11, 23);
    var line = when + "  " + ev.op + "  " + ev.account + "  " + num(ev.tokens) + " tok";
    if (tags.model) { line += "  " + tags.model; }
    if (extra.text) { line += "  " + extra.text; }
    document.getElementById("events").appendChild(el("li", "", line));
  });
  stream.addEventListener("tree", function (m) {
    var tree = JSON.parse(m.data), box = document.getElementById("tree");
    box.replaceChildren();
    render(tree.root, 0, box);
  });
  stream.addEventListener("task", function (m) {
    var t = JSON.parse(m.data), status = document.getElementById("status");
    status.textContent = t.status;
    status.className = t.final ? "final" : "";
    document.getElementById("answer").textContent = t.answer || t.error || "";
    if (t.spent) {
      document.getElementById("spent").textContent =
        "\u2014 spent " + num(t.spent.tokens) + " tokens, $" + t.spent.usd;
    }
  });
  stream.addEventListener("end", function () { stream.close(); });
})();
"""
