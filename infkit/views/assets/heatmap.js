// infkit TokenHeatmap: the front-end of infkit.views.TokenHeatmap (an anywidget ES module, no build step).
//
// Model (synced with Python):
//   rows          [{label, score, detail, group, tokens: [str], values: [number | null | "inf" | "-inf"],
//                   special: [token index]}]   (JSON has no NaN: a NaN value arrives as null)
//   scales        [number] one colour scale per row (Python computes them: shared or per row)
//   normalization "shared" | "row"            (the checkbox in the header sets it; Python recomputes scales)
//   palette       {pos: [r, g, b], neg: [r, g, b]} the ends of the diverging scale (infkit.views.html.RED / BLUE)
//   scale_kind    "diverging" (influence: blue - white - red) | "sequential" (a loss: white 0 … dark at the scale)
//   scale_note    what the legend says about the scale (Python writes it: shared or per row, the percentile clip
//                 and how many tokens lie beyond it)
//   locked        [row, token] or []          (click a token to lock it; click it again to unlock)
//   selected_row  int (-1: none)              (a click on a token or on a row's head selects the row)
//   caption, legend, value_label, busy
//
// The rows are built as one HTML string and set with a single innerHTML (thousands of tokens in a few ms); hover
// and click are handled by delegated listeners on the root, never one listener per token.

const VISIBLE = { "\n": "↵", "\r": "␍", "\t": "⇥", "\u00a0": "⍽", "\u200b": "⟨ZWSP⟩", "\ufeff": "⟨BOM⟩" };
const INVISIBLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u;
const PLAIN = /^[^\p{Cc}\p{Cf}\p{Zl}\p{Zp}\u00a0]*$/u;
const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;" };

export function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESC[c]);
}

// A token's text with its whitespace shown faithfully (the same rules as infkit.views.html.token_html).
export function tokenHtml(text, special) {
  if (text === "") return '<span class="ik-ws">∅</span>';
  if (special || PLAIN.test(text)) return esc(text);
  let out = "";
  for (const ch of text) {
    if (ch in VISIBLE) {
      out += '<span class="ik-ws">' + esc(VISIBLE[ch]) + "</span>" + (ch === "\n" ? "\n" : "");
    } else if (ch !== " " && INVISIBLE.test(ch)) {
      const code = ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
      out += '<span class="ik-ws">⟨U+' + code + "⟩</span>";
    } else {
      out += esc(ch);
    }
  }
  return out;
}

export function decode(v) {
  if (v === null || v === undefined) return NaN;
  if (v === "inf") return Infinity;
  if (v === "-inf") return -Infinity;
  return Number(v);
}

// Python's round(): half to even, so the colours are the exact ones infkit.views.html.color gives.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export function colour(v, scale, palette) {
  if (Number.isNaN(v)) return null;
  const t = scale > 0 ? Math.max(-1, Math.min(1, v / scale)) : 0;
  const end = t >= 0 ? palette.pos : palette.neg;
  const a = Math.abs(t);
  return [0, 1, 2].map((k) => roundHalfEven(255 + a * (end[k] - 255)));
}

function hex(rgb) {
  return "#" + rgb.map((c) => c.toString(16).padStart(2, "0")).join("");
}

// The number format of infkit.views.html.fmt (infkit.fmt.num with a sign): `digits` significant digits, trailing
// zeros kept; a whole number from 10**digits to 10**(digits+1); scientific notation beyond, and below 1e-4.
export function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "—";
  if (Number.isNaN(v)) return "NaN";
  if (!Number.isFinite(v)) return v > 0 ? "+inf" : "-inf";
  if (v === 0) return "0";
  const sign = v > 0 ? "+" : "";
  const sci = () => sign + v.toExponential(digits - 1).replace(/e([+-])(\d)$/, "e$10$2");
  const rounded = Math.abs(Number(v.toPrecision(digits)));
  if (rounded >= 10 ** (digits + 1) || rounded < 1e-4) return sci();
  if (rounded >= 10 ** digits) return sign + v.toFixed(0);
  return sign + v.toPrecision(digits).replace(/\.$/, "");
}

function legendHtml(model, palette, scales) {
  const neg = hex(palette.neg), pos = hex(palette.pos);
  const text = model.get("legend");
  const note = model.get("scale_note") || "";
  if (model.get("scale_kind") === "sequential") {
    // A loss (the query's −log p): one-sided, on a fixed scale; not the influence colours.
    const top = fmt(scales.length ? scales[0] : 1, 3).replace("+", "");
    return (
      '<div class="ik-legend ikw-legend ikw-seqlegend">' +
      '<span class="ik-mono">white 0</span>' +
      `<span class="ik-bar ik-seqbar" style="background:linear-gradient(to right, #ffffff, ${pos})"></span>` +
      `<span class="ik-mono">dark ≥ ${esc(top)}</span>` +
      `<span class="ik-rank">${esc(text)}</span></div>`
    );
  }
  return (
    '<div class="ik-legend ikw-legend">' +
    `<span class="ikw-key" style="color:${neg}">■ opponent −</span>` +
    `<span class="ik-bar" style="background:linear-gradient(to right, ${neg}, #ffffff, ${pos})"></span>` +
    `<span class="ikw-key" style="color:${pos}">+ proponent ■</span>` +
    '<span><span class="ik-swatch ik-tok ik-nan"></span> NaN</span>' +
    `<span class="ik-rank">${esc(text)}</span>` +
    (note ? `<span class="ik-rank ikw-scalenote">Colours: ${esc(note)}.</span>` : "") +
    "</div>"
  );
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "ik ikw ikw-heatmap";
  el.appendChild(root);
  const body = document.createElement("div");
  const tip = document.createElement("div");
  tip.className = "ikw-tip";
  tip.hidden = true;
  let rows = [];
  let scales = [];

  function tokenInfo(r, t) {
    const row = rows[r];
    if (!row || t < 0 || t >= row.tokens.length) return "";
    const v = decode(row.values[t]);
    const scale = scales[r] || 1;
    const norm = Number.isNaN(v) ? "NaN" : fmt(v / scale, 3);
    const label = row.label ? row.label + " · " : "";
    const what = model.get("value_label") || "value";
    return `${label}token ${t} ${JSON.stringify(row.tokens[t])} · ${what} ${fmt(v, 4)} · normalised ${norm}` +
      ` (of ±${fmt(scale, 3).replace("+", "")})`;
  }

  function build() {
    const t0 = performance.now();
    rows = model.get("rows") || [];
    scales = model.get("scales") || [];
    const palette = model.get("palette");
    const perRow = model.get("normalization") === "row";
    const selected = model.get("selected_row");
    const parts = [];
    const caption = model.get("caption");
    parts.push('<div class="ikw-head">');
    parts.push(`<span class="ikw-caption">${esc(caption)}</span>`);
    if (model.get("scale_kind") !== "sequential") {
      parts.push(
        '<label class="ikw-toggle" title="one colour scale per row instead of one shared by all rows">' +
          `<input type="checkbox" data-role="per-row"${perRow ? " checked" : ""}> per-row scale</label>`,
      );
    }
    parts.push("</div>");
    parts.push(legendHtml(model, palette, scales));
    let group = null;
    for (let r = 0; r < rows.length; r++) {
      const row = rows[r];
      if (row.group && row.group !== group) {
        parts.push(`<div class="ikw-group">${esc(row.group)}</div>`);
        group = row.group;
      }
      parts.push(`<div class="ikw-row${r === selected ? " ikw-selected" : ""}" data-r="${r}" data-scale="${scales[r]}">`);
      if (row.label || "score" in row || row.detail) {
        parts.push('<div class="ikw-rowhead">');
        if (row.label) parts.push(`<span class="ikw-label">${esc(row.label)}</span>`);
        if ("score" in row) {
          const s = decode(row.score);
          const kind = s > 0 ? "ik-pro" : s < 0 ? "ik-opp" : Number.isNaN(s) ? "ikw-nanscore" : "";
          parts.push(`<span class="ikw-score ${kind}">${fmt(s, 4)}</span>`);
        }
        if (row.detail) parts.push(`<span class="ik-rank">${esc(row.detail)}</span>`);
        parts.push("</div>");
      }
      parts.push('<div class="ik-seq">');
      const scale = scales[r] || 1;
      const special = new Set(row.special || []);
      const tokens = row.tokens || [];
      const values = row.values || [];
      for (let t = 0; t < tokens.length; t++) {
        const v = decode(values[t]);
        const isSpecial = special.has(t);
        let cls = "ik-tok";
        if (isSpecial) cls += " ik-special";
        let style = "";
        const rgb = colour(v, scale, palette);
        if (rgb === null) {
          cls += " ik-nan";
        } else {
          style = ` style="background:${hex(rgb)}"`;
          if (scale > 0 && Math.abs(v) / scale > 0.6) cls += " ik-dark";
        }
        const dv = Number.isNaN(v) ? "NaN" : String(v);
        parts.push(`<span class="${cls}" data-t="${t}" data-v="${dv}"${style}>${tokenHtml(tokens[t], isSpecial)}</span>`);
      }
      if (tokens.length === 0) parts.push('<span class="ik-rank">(no tokens)</span>');
      parts.push("</div></div>");
    }
    parts.push('<div class="ikw-info" data-role="info"></div>');
    body.innerHTML = parts.join("");
    root.replaceChildren(body, tip);
    applyLock();
    applyBusy();
    root.dataset.renderMs = (performance.now() - t0).toFixed(2);
    root.dataset.tokens = String(rows.reduce((n, row) => n + (row.tokens || []).length, 0));
  }

  function info() {
    return body.querySelector('[data-role="info"]');
  }

  function lockedInfo() {
    const lock = model.get("locked") || [];
    return lock.length === 2 ? "locked: " + tokenInfo(lock[0], lock[1]) + " (click it again to unlock)" : "";
  }

  function applyLock() {
    for (const old of body.querySelectorAll(".ikw-locked")) old.classList.remove("ikw-locked");
    const lock = model.get("locked") || [];
    if (lock.length === 2) {
      const span = body.querySelector(`.ikw-row[data-r="${lock[0]}"] .ik-tok[data-t="${lock[1]}"]`);
      if (span) span.classList.add("ikw-locked");
    }
    const box = info();
    if (box) box.textContent = lockedInfo() || "Hover a token for its value and index; click to lock it.";
  }

  function applySelected() {
    const selected = model.get("selected_row");
    for (const row of body.querySelectorAll(".ikw-row")) {
      row.classList.toggle("ikw-selected", Number(row.dataset.r) === selected);
    }
  }

  function applyBusy() {
    root.classList.toggle("ikw-busy", !!model.get("busy"));
  }

  function where(target) {
    const span = target.closest ? target.closest(".ik-tok") : null;
    const rowEl = target.closest ? target.closest(".ikw-row") : null;
    if (!rowEl || !root.contains(rowEl)) return null;
    return { r: Number(rowEl.dataset.r), t: span && rowEl.contains(span) ? Number(span.dataset.t) : -1, span };
  }

  function onOver(event) {
    const at = where(event.target);
    if (!at || at.t < 0) {
      tip.hidden = true;
      return;
    }
    const text = tokenInfo(at.r, at.t);
    tip.textContent = text;
    tip.hidden = false;
    const box = root.getBoundingClientRect();
    const rect = at.span.getBoundingClientRect();
    tip.style.left = Math.max(0, Math.min(rect.left - box.left, box.width - 320)) + "px";
    tip.style.top = rect.bottom - box.top + 4 + "px";
    const line = info();
    if (line) line.textContent = text;
  }

  function onLeave() {
    tip.hidden = true;
    const line = info();
    if (line) line.textContent = lockedInfo() || "Hover a token for its value and index; click to lock it.";
  }

  function onClick(event) {
    const at = where(event.target);
    if (!at) return;
    if (at.t >= 0) {
      const lock = model.get("locked") || [];
      const same = lock.length === 2 && lock[0] === at.r && lock[1] === at.t;
      model.set("locked", same ? [] : [at.r, at.t]);
    }
    model.set("selected_row", at.r);
    model.save_changes();
  }

  function onChange(event) {
    if (event.target && event.target.dataset && event.target.dataset.role === "per-row") {
      model.set("normalization", event.target.checked ? "row" : "shared");
      model.save_changes();
    }
  }

  root.addEventListener("mouseover", onOver);
  root.addEventListener("mouseleave", onLeave);
  root.addEventListener("click", onClick);
  root.addEventListener("change", onChange);
  const rebuild = () => build();
  model.on("change:rows", rebuild);
  model.on("change:scales", rebuild);
  model.on("change:palette", rebuild);
  model.on("change:caption", rebuild);
  model.on("change:legend", rebuild);
  model.on("change:scale_note", rebuild);
  model.on("change:scale_kind", rebuild);
  model.on("change:normalization", rebuild);
  model.on("change:locked", applyLock);
  model.on("change:selected_row", applySelected);
  model.on("change:busy", applyBusy);
  build();
  return () => {
    for (const name of ["rows", "scales", "palette", "caption", "legend", "scale_note", "scale_kind", "normalization"]) {
      model.off(`change:${name}`, rebuild);
    }
    model.off("change:locked", applyLock);
    model.off("change:selected_row", applySelected);
    model.off("change:busy", applyBusy);
  };
}

export default { render };
