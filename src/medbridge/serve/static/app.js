// medbridge serve page: upload an image, show the labels sorted by probability with thresholds, and the selected
// label's heat map over the X-ray. No external assets; the token (if the service needs one) stays in memory.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { token: "", result: null, label: null, file: null };

  function headers() {
    return state.token ? { Authorization: "Bearer " + state.token } : {};
  }

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({ headers: headers() }, options || {}));
    let body = null;
    try { body = await response.json(); } catch (e) { body = { error: "the service answered " + response.status }; }
    if (response.status === 401) {
      $("token-box").hidden = false;
      $("token").focus();
    }
    if (!response.ok) throw new Error((body && body.error) || ("HTTP " + response.status));
    return body;
  }

  async function loadModel() {
    try {
      const m = await api("/v1/model");
      const cv = m.cross_validation && m.cross_validation.metrics && m.cross_validation.metrics.macro;
      const auroc = cv ? cv.auroc : (m.metrics && m.metrics.macro && m.metrics.macro.auroc);
      const what = cv ? " — " + m.cross_validation.folds + "-fold cross-validated macro AUROC " :
        " — test macro AUROC ";
      $("model-info").textContent = m.method + " on " + m.backbones.join(" + ") + " — " + m.labels.length +
        " labels" + (auroc !== undefined && auroc !== null ? what + (100 * auroc).toFixed(1) : "") +
        (cv ? " (serving " + m.cross_validation.served_fold + ")" : "") + " — thresholds: " + m.threshold_source;
      $("calibration-info").textContent = m.calibration ?
        "Probabilities are calibrated (" + m.calibration + "): 20 % means about 1 in 5 such images had the label." :
        "Probabilities are not calibrated: read them as scores that rank images, not as chances.";
    } catch (e) {
      $("model-info").textContent = "Model description unavailable: " + e.message;
    }
  }

  async function predict(file) {
    showError("");
    $("status").textContent = "Reading and scoring " + file.name + "…";
    const form = new FormData();
    form.append("files", file, file.name);
    try {
      const res = await api("/v1/predict?explain=top1&preview=true", { method: "POST", body: form });
      state.result = res.results[0];
      state.file = file;
      render();
      $("status").textContent = "Scored " + file.name + " (" + state.result.width + " × " + state.result.height +
        " px).";
    } catch (e) {
      $("status").textContent = "";
      showError("Could not score " + file.name + ": " + e.message);
    }
  }

  function pct(p) { return (100 * p).toFixed(1) + "%"; }

  function render() {
    const r = state.result;
    $("result").hidden = false;
    $("threshold-source").textContent = r.threshold_source;
    const sorted = r.predictions.slice().sort((a, b) => b.probability - a.probability);
    const body = document.querySelector("#labels tbody");
    body.textContent = "";
    sorted.forEach((p) => {
      const tr = document.createElement("tr");
      tr.dataset.label = p.label;
      const name = document.createElement("td");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = p.label;
      button.setAttribute("aria-pressed", "false");
      button.addEventListener("click", () => select(p.label));
      button.addEventListener("keydown", (ev) => moveFocus(ev, tr));
      name.appendChild(button);
      const prob = document.createElement("td");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("role", "img");
      const hasThreshold = p.threshold !== null && p.threshold !== undefined;
      tr.title = p.reason || "";
      bar.setAttribute("aria-label", "probability " + pct(p.probability) + (hasThreshold ? ", threshold " +
        pct(p.threshold) : ", no threshold"));
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = pct(p.probability);
      bar.append(fill);
      if (hasThreshold) {
        const mark = document.createElement("span");
        mark.className = "mark";
        mark.style.left = pct(Math.min(p.threshold, 1));
        mark.title = "threshold " + p.threshold.toFixed(3);
        bar.append(mark);
      }
      prob.append(bar, document.createTextNode(pct(p.probability)));
      const thr = document.createElement("td");
      thr.textContent = hasThreshold ? pct(p.threshold) : "none";
      if (!hasThreshold) thr.title = "no threshold: this label was never positive in validation";
      const dec = document.createElement("td");
      const word = document.createElement("span");
      word.className = "decision";
      word.textContent = p.decision || (p.positive ? "positive" : "negative");
      const why = document.createElement("small");
      why.className = "reason";
      why.textContent = p.reason || "";
      dec.append(word, why);
      if (p.positive) dec.className = "positive";
      tr.append(name, prob, thr, dec);
      body.appendChild(tr);
    });
    const gate = $("gate");
    gate.textContent = r.gate && r.gate.length > 1 ? "Share of each frozen backbone in this prediction: " +
      r.gate.map((g) => (100 * g).toFixed(0) + " %").join(", ") : "";
    gate.title = "MedBridge weighs its backbones per image (its 'expert gate'); the shares add up to 100 %.";
    $("boxes-toggle-label").hidden = !r.views || r.views.length < 2;
    $("overlay").dataset.label = "";  // no heat map of the previous image counts as drawn
    const img = $("xray");
    img.onload = () => { drawBoxes(); select(sorted[0].label); };
    img.src = r.preview;
  }

  function moveFocus(ev, tr) {
    let target = null;
    if (ev.key === "ArrowDown") target = tr.nextElementSibling;
    if (ev.key === "ArrowUp") target = tr.previousElementSibling;
    if (target) {
      ev.preventDefault();
      target.querySelector("button").focus();
      select(target.dataset.label);
    }
  }

  function colour(v) {  // inferno (perceptually uniform: lightness rises with relevance), alpha rising too
    const stops = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
      [250, 193, 39], [252, 255, 164]];
    const x = Math.max(0, Math.min(1, v)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x));
    const t = x - i;
    const c = stops[i].map((s, k) => Math.round(s + (stops[i + 1][k] - s) * t));
    return [c[0], c[1], c[2], Math.round(255 * Math.min(1, 0.05 + 0.95 * v))];  // faint where irrelevant
  }

  async function fetchMap(label) {  // heat maps are computed on demand, one label at a time
    const form = new FormData();
    form.append("files", state.file, state.file.name);
    $("status").textContent = "Computing the heat map of " + label + "…";
    try {
      const res = await api("/v1/predict?explain=" + encodeURIComponent(label), { method: "POST", body: form });
      Object.assign(state.result.explanation.maps, res.results[0].explanation.maps);
      $("status").textContent = "Heat map of " + label + " ready.";
    } catch (e) {
      $("status").textContent = "";
      showError("Could not compute the heat map of " + label + ": " + e.message);
    }
  }

  async function select(label) {
    state.label = label;
    document.querySelectorAll("#labels tbody tr").forEach((tr) => {
      const on = tr.dataset.label === label;
      tr.classList.toggle("selected", on);
      tr.querySelector("button").setAttribute("aria-pressed", on ? "true" : "false");
    });
    $("selected-label").textContent = label;
    $("caption").textContent = state.result.image + ": heat map of " + label + " (p = " +
      pct(state.result.predictions.find((p) => p.label === label).probability) + ")";
    const ex = state.result.explanation;
    if (!ex) return;
    if (!ex.maps[label]) {
      $("overlay").dataset.label = "";
      await fetchMap(label);
      if (state.label !== label || !ex.maps[label]) return;
    }
    const src = new Image();
    src.onload = () => {
      const canvas = $("overlay");
      canvas.width = src.width;
      canvas.height = src.height;
      const ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(src, 0, 0);
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
      for (let i = 0; i < data.data.length; i += 4) {
        const v = data.data[i] / 255;
        const c = v < 0.02 ? [0, 0, 0, 0] : colour(v);
        data.data[i] = c[0]; data.data[i + 1] = c[1]; data.data[i + 2] = c[2]; data.data[i + 3] = c[3];
      }
      if (state.label !== label) return;
      ctx.putImageData(data, 0, 0);
      canvas.dataset.label = label;
      applyOpacity();
    };
    src.src = ex.maps[label];
  }

  function drawBoxes() {
    const svg = $("boxes");
    const r = state.result;
    svg.textContent = "";
    svg.setAttribute("viewBox", "0 0 " + r.width + " " + r.height);
    svg.setAttribute("preserveAspectRatio", "none");
    if (!r.views || r.views.length < 2 || !$("boxes-toggle").checked) return;
    const ns = "http://www.w3.org/2000/svg";
    const stroke = Math.max(2, r.width / 300);
    r.views.forEach((v, k) => {
      if (k === 0 && v.box[0] === 0 && v.box[1] === 0 && v.box[2] === r.width && v.box[3] === r.height) return;
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", v.box[0]);
      rect.setAttribute("y", v.box[1]);
      rect.setAttribute("width", v.box[2] - v.box[0]);
      rect.setAttribute("height", v.box[3] - v.box[1]);
      rect.setAttribute("fill", "none");
      rect.setAttribute("stroke", "#ffd400");
      rect.setAttribute("stroke-width", stroke * (0.5 + 2 * v.vote));
      const text = document.createElementNS(ns, "text");
      text.setAttribute("x", v.box[0] + 3 * stroke);
      text.setAttribute("y", v.box[1] + 12 * stroke);
      text.setAttribute("fill", "#ffd400");
      text.setAttribute("font-size", 10 * stroke);
      text.textContent = "vote " + v.vote.toFixed(2);
      svg.append(rect, text);
    });
  }

  function applyOpacity() {
    const v = Number($("opacity").value);
    $("overlay").style.opacity = String(v / 100);
    $("opacity-value").textContent = v + "%";
    $("opacity").setAttribute("aria-valuetext", v + " percent");
  }

  function init() {
    $("file").addEventListener("change", (ev) => { if (ev.target.files.length) predict(ev.target.files[0]); });
    const drop = $("drop");
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => {
      ev.preventDefault(); drop.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      if (ev.dataTransfer.files.length) predict(ev.dataTransfer.files[0]);
    });
    $("opacity").addEventListener("input", applyOpacity);
    $("boxes-toggle").addEventListener("change", drawBoxes);
    $("token-apply").addEventListener("click", () => {
      state.token = $("token").value.trim();
      $("token-box").hidden = true;
      showError("");
      loadModel();
    });
    $("token").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("token-apply").click(); });
    loadModel();
  }

  init();
})();
