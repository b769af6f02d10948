// Draw on the canvas (pointer events: mouse, pen and touch), send it as a PNG to POST /predict
// while drawing (one request in flight at a time), show the top-3 classes with bars, and say
// "not a digit" or "not sure" when the server's verdict says so (docs/calibration.md).
"use strict";
(function () {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const prediction = document.getElementById("prediction");
  const top = document.getElementById("top");
  const status = document.getElementById("status");
  const pen = document.getElementById("pen");
  const penWidth = document.getElementById("pen-width");
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
    pad.toBlob((blob) => {
      const form = new FormData();
      form.append("file", blob, "canvas.png");
      fetch("/predict", { method: "POST", body: form })
        .then((r) => r.json().then((body) => ({ ok: r.ok, body })))
        .then(({ ok, body }) => {
          if (asked !== generation) return;
          if (ok) {
            show(body);
            const verdict = body.predictions[0].verdict;
            status.textContent =
              verdict === "out_of_distribution"
                ? "this does not look like anything the model was trained on"
                : verdict === "unsure"
                  ? "not sure: the model could well be wrong here"
                  : "";
          } else {
            status.textContent = body.detail || "the server refused the drawing";
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
