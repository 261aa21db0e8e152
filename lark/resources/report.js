// LARK report: the question browser of a run page, and column sorting of a sweep page (lark/report.py).
// Data (#lark-data): {epochs, epoch, sources, snippet, ft_source, accuracy: {epoch: acc},
//   queries: [{id, q, c, gold, canary}], docs: {source: [[id, text, canary]]},
//   top: {epoch: {source: [per query: [doc, score, doc, score, ...] by rank]}},
//   pred: {epoch: [per query: [label, loss, correct]] or null}, prov: {query id: [doc ids carrying its fact]},
//   label_set: the gold answers are a label set (a gold-label filter) or free-form (an answer-loss filter),
//   tokens (only when the run wrote attribution/epoch_NNN/tokens/): {levels, texts: [[text, [gap, length, ...]]]
//     (in UTF-16 code units: String.slice's indices, an emoji two),
//     kernel: {epoch: name}, split: {epoch: loss | position}, pairs: {epoch: {source: {query index: {doc index: [doc text, doc shades, doc top,
//     query text, query shades, query top]}}}}} (lark/analysis/report_data.py read_tokens: shades one character
//     per token, ".n" for n tokens without loss; top [token, contribution, ...])}
// Only the visible questions are built; a document's full text and a question's cross-epoch view on demand.
// URL parameters set the first view: ?epoch=2&q=text&label=yes&correct=incorrect&loss=high (&questions: only the
// question browser; &tokens or &tokens=<source>: each question's first document with tokens shown shaded);
// ?selftest runs the checks below and writes their results into <pre id="selftest"> (the browser test reads it).
(function () {
  "use strict";
  const t0 = performance.now();
  const CHUNK = 25;
  const STOP = new Set(("the and for with that this from are was were has have had not but its into than then " +
    "does did can could would should will been being which what when where who whom whose how why all any " +
    "each other some such only own same too very just also more most less least answer context question")
    .split(" "));
  const blobNode = document.getElementById("lark-data");
  const D = blobNode ? JSON.parse(blobNode.textContent) : null;
  const ACC = ((D && D.accuracy_metric) || "accuracy").replace("_", " ");  // exact match is no "accuracy"
  const target = (epoch) =>  // whose answer's loss a checkpoint's scores used (attribution.query_target)
    ((D && D.target) || {})[String(epoch)] === "predicted" ? "predicted answer" : "gold answer";
  const params = new URLSearchParams(location.search);

  function el(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "html") node.innerHTML = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const kid of kids) if (kid != null) node.append(kid);
    return node;
  }
  const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) =>
    ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const TOKEN = /([\p{L}\p{N}_]+)/u;
  function words(text) {
    const out = new Set();
    for (const w of String(text).toLowerCase().split(/[^\p{L}\p{N}_]+/u))
      if (w.length >= 3 && !STOP.has(w)) out.add(w);
    return out;
  }
  // text as HTML with the words of `shared` wrapped in <mark>
  function highlight(text, shared) {
    return String(text).split(TOKEN).map((part, i) =>
      i % 2 && shared.has(part.toLowerCase()) ? "<mark>" + escapeHtml(part) + "</mark>" : escapeHtml(part)).join("");
  }
  const fmt = (x, d) => {  // a small negative shown as 0.000, not -0.000
    if (x == null) return "-";
    const s = Number(x).toFixed(d);
    return /^-0\.?0*$/.test(s) ? s.slice(1) : s;
  };
  // the first `n` characters of a text, and its end when cut: a QA item's answer line or a document's last sentence
  // (where a Formatted document's loss falls) stays in view
  function snippet(text, n) {
    if (text.length <= n) return text;
    text = text.replace(/\s+$/, "");  // a final line break is no line
    if (text.length <= n) return text;
    const cut = Math.max(text.lastIndexOf("\n"), text.lastIndexOf(". ", text.length - 3) + 1);
    const tail = cut > 0 && text.length - cut <= n / 2 ? text.slice(cut).trim() : "";
    return text.slice(0, n - tail.length) + "\u2026" + (tail ? " " + tail : "");
  }

  function sortableTables() {
    for (const table of document.querySelectorAll("table.sortable")) {
      table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
        const body = table.tBodies[0];
        // [0, number] or [1, text]: numbers compare as numbers, cells without one ("-") come last either way
        const key = (tr) => { const t = tr.cells[col].textContent.replace(/[%×,]/g, "").trim();
          return isNaN(parseFloat(t)) ? [1, t] : [0, parseFloat(t)]; };
        const dir = th.dataset.dir === "asc" ? -1 : 1;
        th.dataset.dir = dir === 1 ? "asc" : "desc";
        const cmp = (a, b) => a[0] - b[0] || (a[1] > b[1] ? dir : a[1] < b[1] ? -dir : 0);
        [...body.rows].sort((a, b) => cmp(key(a), key(b))).forEach((tr) => body.append(tr));
      }));
    }
  }
  sortableTables();
  if (params.has("selftest") && !(D && D.queries)) {  // a page without questions (a sweep's): each column sorted
    const table = document.querySelector("table.sortable"), sorted = {};
    const column = (col) => [...table.tBodies[0].rows].map((tr) => tr.cells[col].textContent);
    if (table) table.querySelectorAll("th").forEach((th, col) => { th.click(); const up = column(col);
      th.click(); sorted[th.textContent] = [up, column(col)]; });
    document.body.append(el("pre", {id: "selftest", text: JSON.stringify({sorted})}));
  }
  if (!D || !D.queries) return;

  const Q = D.queries;
  const labels = D.label_set ? [...new Set(Q.map((q) => q.gold).filter((g) => g != null))] : [];
  const haystack = Q.map((q) => (q.id + " " + q.q + " " + q.c).toLowerCase());
  const queryWords = Q.map((q) => words(q.q));
  const prov = Q.map((q) => new Set(D.prov[q.id] || []));
  const firstEpoch = params.has("epoch") && D.epochs.includes(Number(params.get("epoch")))
    ? Number(params.get("epoch")) : D.epoch;
  const hashed = (() => { try { return decodeURIComponent(location.hash.slice(1)); } catch (e) { return ""; } })();
  const byHash = hashed && !document.getElementById(hashed) && Q.some((q) => q.id === hashed) ? hashed : "";
  const state = {epoch: firstEpoch, q: params.get("q") || byHash, label: params.get("label") || "",
    correct: params.get("correct") || "", loss: params.get("loss") || "", list: [], shown: 0};

  const pred = (i, epoch) => { const p = D.pred[String(epoch)]; return p ? p[i] : null; };
  const correct = (i, epoch) => {  // the run's own verdict (exact match normalises text), else label equality
    const p = pred(i, epoch);
    if (!p) return null;
    return p[2] != null ? Boolean(p[2]) : p[0] != null ? p[0] === Q[i].gold : null;
  };
  const thirds = (epoch) => {  // the answer losses that split the questions into thirds at this checkpoint
    const losses = Q.map((_, i) => pred(i, epoch)).filter((p) => p && p[1] != null).map((p) => p[1]).sort((a, b) => a - b);
    return losses.length ? [losses[Math.floor(losses.length / 3)], losses[Math.floor((2 * losses.length) / 3)]] : null;
  };
  const lossThird = (i, epoch, cut) => {
    const p = pred(i, epoch);
    if (!p || p[1] == null || !cut) return null;
    return p[1] < cut[0] ? "low" : p[1] < cut[1] ? "mid" : "high";
  };

  // ---- controls
  const search = el("input", {type: "search", id: "f-text", placeholder: "search question text or id",
    value: state.q, oninput: (e) => { state.q = e.target.value; refresh(); }});
  const select = (id, options, value, key) => {
    const s = el("select", {id, onchange: (e) => { state[key] = e.target.value; refresh(); }});
    for (const [v, label] of options) s.append(el("option", {value: v, text: label}));
    s.value = value;
    return s;
  };
  const reduced = new Set(D.reduced_lr || []);  // epochs trained at a lower learning rate (Table II's *)
  const epochName = (e) => "epoch " + e + (reduced.has(e) ? "*" : "");
  const epochSelect = select("f-epoch", D.epochs.map((e) => [String(e), "checkpoint " + epochName(e) +
    (e === 0 ? " (base)" : "") + (D.accuracy[e] != null ? ", " + ACC + " " + fmt(100 * D.accuracy[e], 1) + "%" : "")]),
    String(state.epoch), "epoch");
  const labelSelect = D.label_set  // free-form answers: one entry per sentence would be useless, so loss thirds
    ? select("f-label", [["", "any gold label"], ...labels.map((l) => [l, "gold = " + l])], state.label, "label")
    : select("f-loss", [["", "any answer loss"], ["low", "answer loss: lowest third"],
      ["mid", "answer loss: middle third"], ["high", "answer loss: highest third"]], state.loss, "loss");
  const correctSelect = select("f-correct", [["", "correct and incorrect"], ["correct", "correct only"],
    ["incorrect", "incorrect only"]], state.correct, "correct");
  // eval=loss predicts nothing: no checkpoint has a verdict, so the filter would show 0 of n either way
  const verdicts = D.epochs.some((e) => Q.some((_, i) => correct(i, e) !== null));
  if (!verdicts) state.correct = "";
  document.getElementById("controls").append(search, epochSelect, labelSelect, ...(verdicts ? [correctSelect] : []));

  function matches(i) {
    if (state.q) for (const term of state.q.toLowerCase().split(/\s+/)) if (term && !haystack[i].includes(term)) return false;
    if (state.label && D.label_set && Q[i].gold !== state.label) return false;
    if (state.loss && !D.label_set && lossThird(i, state.epoch, state.cut) !== state.loss) return false;
    if (state.correct) { const c = correct(i, state.epoch); if (c === null || c !== (state.correct === "correct")) return false; }
    return true;
  }

  const list = document.getElementById("list");
  const count = document.getElementById("count");
  const reading = el("p", {class: "note", id: "reading"});  // its text names the shown checkpoint's target (refresh)
  count.after(reading);
  const sentinel = document.getElementById("sentinel");
  const more = el("button", {id: "more", onclick: () => renderMore()}, "show more questions");
  sentinel.append(more);

  function refresh() {
    state.epoch = Number(epochSelect.value);
    state.cut = thirds(state.epoch);
    state.list = [];
    for (let i = 0; i < Q.length; i++) if (matches(i)) state.list.push(i);
    state.shown = 0;
    list.replaceChildren();
    const acc = D.accuracy[state.epoch];
    count.textContent = state.list.length + " of " + Q.length + " questions" + " \u00b7 checkpoint epoch " +
      state.epoch + (acc != null ? " \u00b7 " + ACC + " " + fmt(100 * acc, 1) + "%" : "");
    count.dataset.shown = state.list.length;
    reading.textContent = "score: the cosine of a document's projected loss gradient with that of the question's " +
      target(state.epoch) + " (the run's kernel); yellow: words the document shares with the question (lexical " +
      "overlap, a reading aid, not attribution)";
    count.dataset.total = Q.length;
    renderMore();
    const url = new URLSearchParams(location.search);
    for (const k of ["q", "label", "correct", "loss"]) state[k] ? url.set(k, state[k]) : url.delete(k);
    url.set("epoch", state.epoch);
    history.replaceState(null, "", "?" + url.toString());
  }

  function renderMore() {
    const end = Math.min(state.list.length, state.shown + CHUNK);
    const frag = document.createDocumentFragment();
    for (let n = state.shown; n < end; n++) frag.append(card(state.list[n]));
    list.append(frag);
    state.shown = end;
    more.hidden = state.shown >= state.list.length;
  }

  // ---- token-wise attribution: a pair's document and question with each token shaded by its contribution
  const T = D.tokens || null;
  const SHADES = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxy";  // level -levels..levels (report_data.SHADES)
  const COLOURS = {pos: "42, 91, 215", neg: "214, 84, 31"};  // as report.css's .sw.pos / .sw.neg
  const tokenPair = (epoch, source, i, d) =>
    T ? ((((T.pairs[String(epoch)] || {})[source] || {})[String(i)] || {})[String(d)] || null) : null;
  const spansCache = new Map();
  function tokenSpans(t) {  // [[start, end] per token] of T.texts[t], UTF-16 code units (report_data.utf16)
    if (!spansCache.has(t)) {
      const offsets = T.texts[t][1], spans = [];
      for (let n = 0, at = 0; n < offsets.length; n += 2) { const s = at + offsets[n]; at = s + offsets[n + 1]; spans.push([s, at]); }
      spansCache.set(t, spans);
    }
    return spansCache.get(t);
  }
  const signed = (c) => (c > 0 ? "+" : "") + Number(c).toPrecision(4);
  const signClass = (x) => (x > 0 ? "pos" : x < 0 ? "neg" : "zero");

  function shadedText(t, packed) {
    const text = T.texts[t][0];
    const shades = packed.replace(/\.(\d+)/g, (_, n) => ".".repeat(Number(n)));  // ".n": n tokens without loss
    const box = el("div", {class: "tok-text"});
    let at = 0;
    tokenSpans(t).forEach(([start, end], n) => {
      if (start > at) box.append(text.slice(at, start));
      const level = shades[n] === "." ? null : SHADES.indexOf(shades[n]) - T.levels;
      const dark = Math.abs(level) > 0.55 * T.levels ? " dark" : "";  // white text on the strongest shades
      const piece = text.slice(Math.max(start, at), end);
      const nl = level !== null && piece.includes("\n") && !piece.trim() ? " nl" : "";  // its shade drawn on a \u21b5 (CSS)
      const span = el("span", {class: "tk " + (level === null ? "none" : signClass(level)) + dark + nl, "data-n": n,
        text: piece});
      if (level !== null) span.dataset.l = level;
      if (level) span.style.backgroundColor = "rgba(" + COLOURS[signClass(level)] + ", " +
        (Math.abs(level) / T.levels).toFixed(2) + ")";
      box.append(span);
      at = Math.max(at, end);
    });
    if (at < text.length) box.append(text.slice(at));
    return box;
  }

  function topList(t, top) {
    const text = T.texts[t][0], spans = tokenSpans(t);
    const ol = el("ol", {class: "top-tokens"});
    for (let r = 0; r < top.length; r += 2) {
      const [start, end] = spans[top[r]];
      ol.append(el("li", {class: signClass(top[r + 1]), "data-n": top[r], "data-c": top[r + 1]},
        el("code", {text: JSON.stringify(text.slice(start, end)), title: text.slice(start, end)}), " ",
        el("span", {class: "c", text: signed(top[r + 1])})));
    }
    return ol;
  }

  function tokenView(epoch, source, i, d, score) {
    const [dt, ds, dtop, qt, qs, qtop] = tokenPair(epoch, source, i, d);
    const byPosition = (T.split || {})[String(epoch)] === "position";  // attribution.tokens_split
    const legend = el("div", {class: "tok-legend"}, el("span", {class: "sw pos"}), " raises the score ",
      el("span", {class: "sw neg"}), " lowers it \u00b7 shade \u221d |contribution| / the largest in that text \u00b7 " +
      (byPosition ? "split by position: a token's part is the gradient through its position's use of the weights, " +
        "prompt included" : "grey: a token without loss") +
      " \u00b7 each text's contributions sum to the pair's score " + fmt(score, 4) +
      " (epoch " + epoch + ", kernel " + (T.kernel[String(epoch)] || "?") + ")");
    return el("div", {class: "tokens", "data-epoch": epoch, "data-source": source, "data-query": Q[i].id,
      "data-doc": D.docs[source][d][0]}, legend,
      el("h6", {text: "document " + D.docs[source][d][0] + " (" + source + ")"}), shadedText(dt, ds),
      el("p", {class: "note", text: "largest |contribution|:"}), topList(dt, dtop),
      el("h6", {text: "question " + Q[i].id + (byPosition ? " (its positions: which words of the prompt and the " :
        " (its loss tokens: which words of the ") + target(epoch) + " drive the match)"}),
      shadedText(qt, qs), el("p", {class: "note", text: "largest |contribution|:"}), topList(qt, qtop));
  }

  // a "tokens" button that shows the pair's tokenView in `box` (one view per box; a second click closes it), or null
  // for a pair without token files. A question's box is a full-width row of its sources' grid, moved after the
  // clicked document's list (the grid packs densely, so the view opens in the row below that list).
  function tokenButton(box, epoch, source, i, d, score) {
    if (!tokenPair(epoch, source, i, d)) return null;
    const key = [epoch, source, d].join("/");
    return el("button", {class: "tok-btn", title: "the document and question shaded by each token's contribution",
      onclick: (event) => {
        const open = box.firstChild && box.firstChild.dataset.key === key;
        if (box.parentNode && box.parentNode.classList.contains("sources")) event.currentTarget.closest("section.src").after(box);
        box.replaceChildren(...(open ? [] : [tokenView(epoch, source, i, d, score)]));
        if (!open) box.firstChild.dataset.key = key;
      }}, "tokens");
  }

  function badge(cls, text, title) { return el("span", {class: "badge " + cls, text, title: title || ""}); }

  function card(i) {
    const q = Q[i];
    const p = pred(i, state.epoch);
    const ok = correct(i, state.epoch);
    const head = el("header", {},
      el("span", {class: "qid", text: q.id}),
      badge("gold", "gold: " + q.gold),
      p && p[0] != null ? badge(ok ? "ok" : "bad", "predicted: " + p[0] + (ok ? " \u2713" : " \u2717")) : null,
      p && p[1] != null ? badge("loss", "loss " + fmt(p[1], 3), "mean negative log-likelihood per token of the gold " +
        "answer (its end-of-turn token included)") : null,
      p && p[0] != null && !ok ? badge("target", "documents ranked for the " + target(state.epoch), "the scores compare " +
        "each document's gradient with that of the " + target(state.epoch) + "'s loss (attribution.query_target)") : null,
      q.canary ? badge("canary", "canary") : null);
    const ctx = el("details", {class: "ctx"}, el("summary", {text: "context"}));
    ctx.addEventListener("toggle", () => { if (ctx.open && ctx.children.length === 1) ctx.append(el("p", {text: q.c})); },
      {once: false});
    const across = el("div", {class: "across"});
    const acrossButton = el("button", {class: "across-btn", onclick: () => {
      if (across.childElementCount) across.replaceChildren(); else across.append(acrossView(i));
    }}, "top documents across epochs");
    const tokenBox = T ? el("div", {class: "tok-box"}) : null;  // a run without tokens: as before
    const sources = sourcesView(i, state.epoch, tokenBox);
    const article = el("article", {class: "q", "data-index": i, "data-id": q.id}, head,
      el("p", {class: "question", text: q.q}), ctx, sources, acrossButton, across);
    if (params.has("tokens")) {  // &tokens=<source>: that source's first document, else the first with tokens
      const within = params.get("tokens") ? 'section.src[data-source="' + CSS.escape(params.get("tokens")) + '"] ' : "";
      article.querySelector(within + "button.tok-btn")?.click();
    }
    return article;
  }

  function sourcesView(i, epoch, tokenBox) {
    const box = el("div", {class: "sources"});
    for (const source of D.sources) {
      const ranked = ((D.top[String(epoch)] || {})[source] || [])[i] || [];
      const ol = el("ol", {class: "docs"});
      for (let r = 0; r < ranked.length; r += 2) ol.append(docItem(i, source, ranked[r], ranked[r + 1], r / 2 + 1, epoch, tokenBox));
      box.append(el("section", {class: "src", "data-source": source},
        el("h4", {text: source + (source === D.ft_source ? " (fine-tuning)" : "")},
          el("small", {text: ranked.length ? " top " + ranked.length / 2 : " no documents"})), ol));
    }
    if (tokenBox) box.append(tokenBox);
    return box;
  }

  function docItem(i, source, d, score, rank, epoch, tokenBox) {
    const [id, text, canary] = D.docs[source][d];
    const snippetLength = D.snippet;
    const long = text.length > snippetLength;
    const body = el("div", {class: "text", html: highlight(snippet(text, snippetLength), queryWords[i])});
    const toggle = long ? el("button", {class: "expand", onclick: () => {
      const open = toggle.dataset.open === "1";
      body.innerHTML = highlight(open ? snippet(text, snippetLength) : text, queryWords[i]);
      toggle.dataset.open = open ? "0" : "1";
      toggle.textContent = open ? "full text" : "less";
    }}, "full text") : null;
    return el("li", {"data-doc": id},
      el("div", {class: "meta"}, el("span", {class: "rank", text: "#" + rank}),
        el("span", {class: "score", text: fmt(score, 4)}), el("span", {class: "did", text: id}),
        prov[i].has(id) ? badge("prov", "provenance", "this document carries the question's fact") : null,
        canary ? badge("canary", "canary") : null, toggle, tokenButton(tokenBox, epoch, source, i, d, score)),
      body);
  }

  // one question's top documents at every epoch: rows = rank, columns = epochs
  function acrossView(i) {
    const box = el("div", {});
    for (const source of D.sources) {
      const byEpoch = D.epochs.map((e) => ((D.top[String(e)] || {})[source] || [])[i] || []);
      const ranks = Math.max(0, ...byEpoch.map((r) => r.length / 2));
      const idsAt = byEpoch.map((r) => new Set(r.filter((_, n) => n % 2 === 0)));
      const table = el("table", {class: "across-table"},
        el("thead", {}, el("tr", {}, el("th", {text: "rank"}), ...D.epochs.map((e) => el("th", {text: epochName(e)})))));
      const tbody = el("tbody");
      tbody.append(el("tr", {class: "answers"}, el("td", {text: "answer"}), ...D.epochs.map((e) => {  // the model's, then
        const p = pred(i, e), ok = correct(i, e);
        return el("td", {}, p && p[0] != null ? badge(ok ? "ok" : "bad", p[0] + (ok ? " \u2713" : " \u2717")) : "",
          p && p[1] != null ? el("small", {text: " loss " + fmt(p[1], 3)}) : null);
      })));
      const tokenBox = T ? el("div", {class: "tok-box"}) : null;  // a run without tokens: as before
      for (let r = 0; r < ranks; r++) {
        const tr = el("tr", {}, el("td", {text: "#" + (r + 1)}));
        byEpoch.forEach((ranked, n) => {
          if (2 * r >= ranked.length) { tr.append(el("td", {text: "-"})); return; }
          const [id, text] = D.docs[source][ranked[2 * r]];
          const stable = idsAt.every((s) => s.has(ranked[2 * r]));
          tr.append(el("td", {class: (prov[i].has(id) ? "prov " : "") + (stable ? "stable" : ""),
            title: text.slice(0, 300)}, el("span", {class: "did", text: id}), " ", el("small", {text: fmt(ranked[2 * r + 1], 3)}),
            tokenButton(tokenBox, D.epochs[n], source, i, ranked[2 * r], ranked[2 * r + 1])));
        });
        tbody.append(tr);
      }
      table.append(tbody);
      box.append(el("h5", {text: source}), table);
      if (tokenBox) box.append(tokenBox);
    }
    box.append(el("p", {class: "note", text: "bold: in the top list at every epoch; green: carries the question's fact " +
      "(provenance); answer: the model's at that checkpoint and its gold-answer loss" +
      (reduced.size ? "; *: trained at a lower learning rate" : "") + ". Hover a cell for the document's text."}));
    return box;
  }

  if ("IntersectionObserver" in window) {
    new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting) && state.shown < state.list.length) renderMore(); })
      .observe(sentinel);
  }
  refresh();
  if (params.has("questions")) document.body.classList.add("questions-only");
  if (location.hash && document.getElementById(location.hash.slice(1)))
    document.getElementById(location.hash.slice(1)).scrollIntoView();
  document.body.dataset.readyMs = Math.round(performance.now() - t0);

  if (params.has("selftest")) {
    const out = {ready_ms: Number(document.body.dataset.readyMs), queries: Q.length,
      cards: list.querySelectorAll("article.q").length, count_text: count.textContent};
    const first = list.querySelector("article.q li");
    if (first) {
      const source = first.closest("section.src").dataset.source;
      const doc = D.docs[source].find((d) => d[0] === first.dataset.doc);
      const expand = first.querySelector("button.expand");
      if (expand) expand.click();
      out.first_doc = {id: doc[0], source, full_text_shown: first.querySelector(".text").textContent === doc[1],
        marks: first.querySelectorAll("mark").length};
    }
    const shown = () => list.querySelectorAll("article.q").length;
    const set = (node, value, event) => { node.value = value; node.dispatchEvent(new Event(event)); };
    set(search, Q[0].id, "input");
    out.search_by_id = {value: Q[0].id, cards: shown(), first: list.querySelector("article.q")?.dataset.id};
    set(search, "", "input");
    out.labels = {};
    for (const l of labels) { set(labelSelect, l, "change"); out.labels[l] = Number(count.dataset.shown); }
    if (!D.label_set) {
      out.loss = {};
      for (const t of ["low", "mid", "high"]) { set(labelSelect, t, "change"); out.loss[t] = Number(count.dataset.shown); }
      set(labelSelect, "low", "change");  // which questions: the shown checkpoint's lowest third, not another's
      out.loss_low_ids = [...list.querySelectorAll("article.q")].map((a) => a.dataset.id);
    }
    set(labelSelect, "", "change");
    out.correct = {};
    out.verdict_filter = verdicts;
    out.prediction_badges = list.querySelectorAll("article.q .badge.ok, article.q .badge.bad").length;
    for (const e of verdicts ? D.epochs : []) {
      set(epochSelect, String(e), "change");
      set(correctSelect, "correct", "change");
      out.correct[e] = Number(count.dataset.shown);
      set(correctSelect, "incorrect", "change");
      out.correct[e] = [out.correct[e], Number(count.dataset.shown)];
      set(correctSelect, "", "change");
    }
    const button = list.querySelector("button.across-btn");
    if (button) {
      button.click();
      const table = list.querySelector(".across-table");
      out.across_columns = table.querySelector("thead tr").children.length - 1;
      out.across_headers = [...table.querySelector("thead tr").children].slice(1).map((th) => th.textContent);
      out.across_answers = [...table.querySelector("tr.answers").children].slice(1).map((td) => td.textContent);
    }
    if (T) out.tokens = tokenSelftest();
    document.body.append(el("pre", {id: "selftest", text: JSON.stringify(out)}));
  }

  // the first card's first token view and its cross-epoch view's first one, opened, as the test compares them
  function tokenSelftest() {
    const describe = (view) => view && {epoch: Number(view.dataset.epoch), source: view.dataset.source,
      query: view.dataset.query, doc: view.dataset.doc, legend: view.querySelector(".tok-legend .sw.pos") ? view.querySelector(".tok-legend").textContent : "",
      headings: [...view.querySelectorAll("h6")].map((h) => h.textContent),
      texts: [...view.querySelectorAll(".tok-text")].map((box) => box.textContent),
      top: [...view.querySelectorAll("ol.top-tokens")].map((ol) => [...ol.children].map((li) =>
        [JSON.parse(li.querySelector("code").textContent), Number(li.dataset.c), li.querySelector(".c").textContent]))};
    const card = list.querySelector("article.q");
    const opened = (button, box) => { if (!button) return null; button.click(); return describe(box(button).querySelector("div.tokens")); };
    return {buttons: list.querySelectorAll("ol.docs button.tok-btn").length,
      first: opened(card?.querySelector("ol.docs button.tok-btn"), (b) => b.closest("article")),
      across: opened(card?.querySelector(".across-table button.tok-btn"), (b) => b.closest("table").nextElementSibling)};
  }
})();
