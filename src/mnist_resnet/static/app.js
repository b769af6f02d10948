// Draw on the canvas (pointer events: mouse, pen and touch), send it as a PNG to POST /predict
// while drawing (one request in flight at a time), show the top-3 classes with bars, and say
// "not a digit" or "not sure" when the server's verdict says so (docs/calibration.md).
// With "show what the network looks at" on, the same loop asks POST /explain instead: /predict's
// answer plus the 28x28 input the model saw and the integrated-gradients maps of the answer and
// the runner-up, drawn over that input (red for the class, blue against, one symmetric scale).
"use strict";
(function () {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const prediction = document.getElementById("prediction");
  const top = document.getElementById("top");
  const status = document.getElementById("status");
  const pen = document.getElementById("pen");
  const penWidth = document.getElementById("pen-width");
  const explainBox = document.getElementById("explain");
  const why = document.getElementById("why");
  const whyTiming = document.getElementById("why-timing");
  const panels = ["why-answer", "why-runner-up"].map((id) => {
    const heat = document.getElementById(id);
    return { heat, input: heat.previousElementSibling, label: document.getElementById(`${id}-label`) };
  });
  const WARM = [208, 28, 0]; // the legend's colours (style.css)
  const COOL = [31, 95, 255];
  let drawing = false;
  let last = null;
  let inked = false;
  let inFlight = false;
  let dirty = false;
  let generation = 0; // bumped by Clear, so late answers for an old drawing are ignored
  let notOne = "not a digit"; // what an out-of-distribution answer reads; set from /model

  // "busy" while an answer for the drawing is pending, "idle" once the page shows the answer
  // for the very pixels on the canvas: tests (and scripts) wait on it instead of sleeping.
  function setState() {
    pad.dataset.state = inFlight || dirty ? "busy" : "idle";
  }

  function reset() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
    ctx.strokeStyle = "#fff";
    ctx.fillStyle = "#fff";
    ctx.lineWidth = Number(pen.value);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    inked = false;
    dirty = false;
    generation += 1;
    prediction.textContent = "–";
    prediction.classList.remove("doubt", "words");
    delete pad.dataset.verdict;
    top.replaceChildren();
    status.textContent = "waiting for a stroke";
    clearWhy();
    setState();
  }

  function point(event) {
    const rect = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * pad.width) / rect.width,
      y: ((event.clientY - rect.top) * pad.height) / rect.height,
    };
  }

  function dot(p) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function line(a, b) {
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
  }

  function show(answer) {
    const best = answer.predictions[0];
    pad.dataset.verdict = best.verdict;
    const outside = best.verdict === "out_of_distribution";
    prediction.textContent = outside ? notOne : best.prediction;
    prediction.classList.toggle("doubt", best.verdict !== "sure");
    prediction.classList.toggle("words", outside);
    top.replaceChildren(
      ...best.top.map((c) => {
        const row = document.createElement("li");
        const name = document.createElement("span");
        name.textContent = c.class;
        const bar = document.createElement("div");
        bar.className = "bar";
        const fill = document.createElement("span");
        fill.style.width = (100 * c.probability).toFixed(1) + "%";
        bar.appendChild(fill);
        const pct = document.createElement("span");
        pct.className = "pct";
        pct.textContent = (100 * c.probability).toFixed(1) + "%";
        row.append(name, bar, pct);
        return row;
      })
    );
  }

  function clearWhy() {
    for (const panel of panels) {
      for (const c of [panel.input, panel.heat]) c.getContext("2d").clearRect(0, 0, c.width, c.height);
      panel.label.textContent = "";
    }
    whyTiming.textContent = "";
    delete why.dataset.drawn;
  }

  // The maps of the answer and the runner-up over the input the model saw (dimmed), on one scale
  // symmetric around 0: opaque red or blue where a pixel counts most, for or against the class.
  function drawWhy(best, ms) {
    const size = best.image.length;
    let limit = 0;
    for (const m of best.attributions) {
      for (const row of m.attribution) for (const v of row) limit = Math.max(limit, Math.abs(v));
    }
    panels.forEach((panel, j) => {
      const m = best.attributions[j];
      const inputCtx = panel.input.getContext("2d");
      const heatCtx = panel.heat.getContext("2d");
      const base = inputCtx.createImageData(size, size);
      const heat = heatCtx.createImageData(size, size);
      for (let y = 0; y < size; y++) {
        for (let x = 0; x < size; x++) {
          const i = 4 * (y * size + x);
          base.data.fill(Math.round(best.image[y][x] / 3), i, i + 3);
          base.data[i + 3] = 255;
          const a = m && limit > 0 ? Math.max(-1, Math.min(1, m.attribution[y][x] / limit)) : 0;
          heat.data.set(a > 0 ? WARM : COOL, i);
          heat.data[i + 3] = Math.round(255 * Math.abs(a));
        }
      }
      inputCtx.putImageData(base, 0, 0);
      heatCtx.putImageData(heat, 0, 0);
      const role = j === 0 ? "answer" : "runner-up";
      panel.label.textContent = m ? `${role}: ${m.class} (${(100 * m.probability).toFixed(1)}%)` : "";
    });
    whyTiming.textContent = `, ${best.steps} steps; last update ${Math.round(ms)} ms`;
    // Tests and scripts wait on this (and on the pad's data-state) instead of sleeping.
    why.dataset.drawn = "true";
    why.dataset.ms = ms.toFixed(1);
    why.dispatchEvent(new CustomEvent("explained", { detail: { ms } }));
  }

  function send() {
    if (!inked) return;
    if (inFlight) {
      dirty = true;
      setState();
      return;
    }
    inFlight = true;
    dirty = false;
    setState();
    const asked = generation;
    const explaining = explainBox.checked;
    const started = performance.now();
    pad.toBlob((blob) => {
      const form = new FormData();
      form.append("file", blob, "canvas.png");
      fetch(explaining ? "/explain" : "/predict", { method: "POST", body: form })
        .then((r) => r.json().then((body) => ({ ok: r.ok, body })))
        .then(({ ok, body }) => {
          if (asked !== generation) return;
          if (ok) {
            show(body);
            // An answer from before the toggle was switched off draws nothing.
            if (explaining && explainBox.checked) {
              drawWhy(body.predictions[0], performance.now() - started);
            }
            const verdict = body.predictions[0].verdict;
            status.textContent =
              verdict === "out_of_distribution"
                ? "this does not look like anything the model was trained on"
                : verdict === "unsure"
                  ? "not sure: the model could well be wrong here"
                  : "";
          } else {
            status.textContent = body.detail || "the server refused the drawing";
            clearWhy();
          }
        })
        .catch(() => {
          status.textContent = "server unreachable";
        })
        .finally(() => {
          inFlight = false;
          if (dirty) send();
          setState();
        });
    }, "image/png");
  }

  pad.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    dot(last);
    inked = true;
    send();
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    event.preventDefault();
    const p = point(event);
    line(last, p);
    last = p;
    send();
  });
  function stop() {
    if (!drawing) return;
    drawing = false;
    send();
  }
  pad.addEventListener("pointerup", stop);
  pad.addEventListener("pointercancel", stop);
  document.getElementById("clear").addEventListener("click", reset);
  // Off by default: an update then costs the server about 15 times the CPU of a prediction
  // (docs/serving.md), and most visitors come to see the guess. Switched on, what is drawn
  // already is explained at once (after the request in flight, if any).
  explainBox.addEventListener("change", () => {
    why.hidden = !explainBox.checked;
    clearWhy();
    if (explainBox.checked) send();
  });
  // Any pen from a fine 1 px to a marker: the server brings strokes to MNIST's thickness.
  pen.addEventListener("input", () => {
    ctx.lineWidth = Number(pen.value);
    penWidth.textContent = `${pen.value} px`;
  });

  fetch("/model")
    .then((r) => r.json())
    .then((m) => {
      const acc = m.test_accuracy == null ? "" : `, ${(100 * m.test_accuracy).toFixed(2)}% on the test set`;
      const shipped = m.pretrained ? "pretrained " : "";
      document.getElementById("model").textContent =
        `model: ${shipped}${m.preset} on ${m.dataset}${acc}`;
      // A model of digits asks for a digit; any other asks for one of its own classes.
      const digits = m.class_names.every((name, i) => name === String(i));
      if (!digits) {
        const names = m.class_names.slice(0, 12).join(", ");
        const more = m.class_names.length > 12 ? ", …" : "";
        const title = `Draw one of: ${names}${more}`;
        document.querySelector("h1").textContent = title;
        document.title = `mnist-resnet: ${title}`;
        notOne = "none of these";
      }
    })
    .catch(() => {});
  reset();
})();
