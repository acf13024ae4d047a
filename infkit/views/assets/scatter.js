// infkit ScoreScatter: the scatter of EstimatorComparison (an anywidget ES module, no build step).
//
// Model (synced with Python):
//   x, y        [number | null]   one point per (query, train example); null = NaN (not drawn, counted)
//   query, index [int]            which query and train example each point is
//   selected    [query, index] or []   (click a point to select it; Python then shows that pair's heatmaps)
//   xlabel, ylabel, title, palette {pos, neg}
//
// Drawn on a canvas (tens of thousands of points stay fast); a click picks the nearest point within 10 px.

function fmt(v) {
  if (v === null || Number.isNaN(v)) return "NaN";
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(2) : v.toPrecision(3);
}

function rgba(c, alpha) {
  return `rgba(${c[0]}, ${c[1]}, ${c[2]}, ${alpha})`;
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "ik ikw ikw-scatter";
  const title = document.createElement("div");
  title.className = "ikw-caption";
  const canvas = document.createElement("canvas");
  const info = document.createElement("div");
  info.className = "ikw-info";
  root.append(title, canvas, info);
  el.appendChild(root);
  const W = 460, H = 380, M = { l: 64, r: 14, t: 10, b: 46 };
  const dpr = window.devicePixelRatio || 1;
  canvas.width = W * dpr;
  canvas.height = H * dpr;
  canvas.style.width = W + "px";
  canvas.style.height = H + "px";
  const ctx = canvas.getContext("2d");
  let px = new Float32Array(0), py = new Float32Array(0);

  function draw() {
    const t0 = performance.now();
    const xs = model.get("x") || [], ys = model.get("y") || [];
    const qs = model.get("query") || [], is = model.get("index") || [];
    const pal = model.get("palette");
    const sel = model.get("selected") || [];
    title.textContent = model.get("title");
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity, nan = 0;
    for (let k = 0; k < xs.length; k++) {
      const x = xs[k], y = ys[k];
      if (x === null || y === null || !Number.isFinite(x) || !Number.isFinite(y)) { nan++; continue; }
      x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
    }
    if (!(x1 >= x0)) { x0 = -1; x1 = 1; y0 = -1; y1 = 1; }
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= 1; y1 += 1; }
    const padX = 0.04 * (x1 - x0), padY = 0.04 * (y1 - y0);
    x0 -= padX; x1 += padX; y0 -= padY; y1 += padY;
    const sx = (x) => M.l + ((x - x0) / (x1 - x0)) * (W - M.l - M.r);
    const sy = (y) => H - M.b - ((y - y0) / (y1 - y0)) * (H - M.t - M.b);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, W, H);
    ctx.strokeStyle = "#888";
    ctx.lineWidth = 1;
    ctx.strokeRect(M.l, M.t, W - M.l - M.r, H - M.t - M.b);
    ctx.strokeStyle = "#ccc";
    ctx.setLineDash([4, 3]);
    if (x0 < 0 && x1 > 0) { ctx.beginPath(); ctx.moveTo(sx(0), M.t); ctx.lineTo(sx(0), H - M.b); ctx.stroke(); }
    if (y0 < 0 && y1 > 0) { ctx.beginPath(); ctx.moveTo(M.l, sy(0)); ctx.lineTo(W - M.r, sy(0)); ctx.stroke(); }
    ctx.setLineDash([]);
    ctx.fillStyle = "#333";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText(fmt(x0 + padX), M.l + 14, H - M.b + 14);
    ctx.fillText(fmt(x1 - padX), W - M.r - 18, H - M.b + 14);
    ctx.fillText(model.get("xlabel"), (M.l + W - M.r) / 2, H - 10);
    ctx.save();
    ctx.translate(14, (M.t + H - M.b) / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(model.get("ylabel"), 0, 0);
    ctx.restore();
    ctx.textAlign = "right";
    ctx.fillText(fmt(y1 - padY), M.l - 4, M.t + 10);
    ctx.fillText(fmt(y0 + padY), M.l - 4, H - M.b - 2);
    px = new Float32Array(xs.length);
    py = new Float32Array(xs.length);
    const grey = [120, 120, 120];
    for (let k = 0; k < xs.length; k++) {
      const x = xs[k], y = ys[k];
      if (x === null || y === null || !Number.isFinite(x) || !Number.isFinite(y)) { px[k] = NaN; py[k] = NaN; continue; }
      px[k] = sx(x); py[k] = sy(y);
      const c = x > 0 && y > 0 ? pal.pos : x < 0 && y < 0 ? pal.neg : grey;
      ctx.fillStyle = rgba(c, 0.55);
      ctx.beginPath();
      ctx.arc(px[k], py[k], 2.6, 0, 2 * Math.PI);
      ctx.fill();
    }
    if (sel.length === 2) {
      for (let k = 0; k < xs.length; k++) {
        if (qs[k] === sel[0] && is[k] === sel[1] && !Number.isNaN(px[k])) {
          ctx.strokeStyle = "#000";
          ctx.lineWidth = 2;
          ctx.beginPath();
          ctx.arc(px[k], py[k], 6, 0, 2 * Math.PI);
          ctx.stroke();
        }
      }
    }
    const shown = xs.length - nan;
    info.textContent = `${shown} points` + (nan ? ` (${nan} with a NaN score not drawn)` : "") +
      ". Red: both estimators say proponent; blue: both say opponent; grey: they disagree. Click a point.";
    root.dataset.points = String(shown);
    root.dataset.renderMs = (performance.now() - t0).toFixed(2);
  }

  function nearest(event) {
    const rect = canvas.getBoundingClientRect();
    const x = event.clientX - rect.left, y = event.clientY - rect.top;
    let best = -1, bestD = 100;
    for (let k = 0; k < px.length; k++) {
      const dx = px[k] - x, dy = py[k] - y;
      const d = dx * dx + dy * dy;
      if (d < bestD) { bestD = d; best = k; }
    }
    return best;
  }

  canvas.addEventListener("mousemove", (event) => {
    const k = nearest(event);
    if (k < 0) return;
    const xs = model.get("x"), ys = model.get("y");
    info.textContent = `query ${model.get("query")[k]}, train ${model.get("index")[k]}: ` +
      `${model.get("xlabel")} ${fmt(xs[k])}, ${model.get("ylabel")} ${fmt(ys[k])}`;
  });
  canvas.addEventListener("click", (event) => {
    const k = nearest(event);
    if (k < 0) return;
    model.set("selected", [model.get("query")[k], model.get("index")[k]]);
    model.save_changes();
  });
  const names = ["x", "y", "query", "index", "selected", "xlabel", "ylabel", "title", "palette"];
  for (const name of names) model.on(`change:${name}`, draw);
  draw();
  return () => {
    for (const name of names) model.off(`change:${name}`, draw);
  };
}

export default { render };
