// The offseg serve page: sends each chosen picture to POST /v1/segment and shows the answer.
// Plain JavaScript, no libraries, nothing fetched from elsewhere (works offline).
"use strict";

const state = { card: null, colourToClass: new Map(), ready: null };

function colourKey(r, g, b) {
  return (r << 16) | (g << 8) | b;
}

async function loadModelCard() {
  const info = document.getElementById("model-info");
  const response = await fetch("/v1/model");
  state.card = await response.json();
  for (const cls of state.card.classes) {
    const [r, g, b] = cls.color;
    // two classes with one colour: the first keeps it (the pointer read-out may then name it)
    if (!state.colourToClass.has(colourKey(r, g, b))) state.colourToClass.set(colourKey(r, g, b), cls.id);
  }
  const scale = state.card.test_scale ? `test scale ${state.card.test_scale.join("x")}` : "each picture at its own size";
  info.textContent = `${state.card.model} · ${state.card.num_classes} classes · ${state.card.test_mode.mode} inference · ${scale}`;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not show the label map"));
    img.src = src;
  });
}

// Class ids of the label map, read back from its palette colours.
function classIds(labelImg, canvas) {
  canvas.width = labelImg.naturalWidth;
  canvas.height = labelImg.naturalHeight;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(labelImg, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const ids = new Int32Array(canvas.width * canvas.height);
  for (let i = 0; i < ids.length; i++) {
    const id = state.colourToClass.get(colourKey(rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]));
    ids[i] = id === undefined ? -1 : id;
  }
  return ids;
}

function fillLegend(section, answer) {
  const body = section.querySelector(".legend tbody");
  const rows = [...answer.classes].sort((a, b) => b.fraction - a.fraction);
  for (const cls of rows) {
    const tr = document.createElement("tr");
    tr.dataset.classId = cls.id;
    const [r, g, b] = state.card.classes[cls.id].color;
    tr.innerHTML = `<td><span class="swatch" style="background: rgb(${r}, ${g}, ${b})"></span></td><td class="name"></td><td class="area"></td>`;
    tr.querySelector(".name").textContent = cls.name;
    tr.querySelector(".area").textContent = `${(100 * cls.fraction).toFixed(1)} %`;
    body.appendChild(tr);
  }
}

function followPointer(section, ids, width, height) {
  const readout = section.querySelector(".pointer");
  for (const view of section.querySelectorAll(".view")) {
    view.addEventListener("mousemove", (event) => {
      const box = view.getBoundingClientRect();
      const x = Math.min(width - 1, Math.max(0, Math.floor(((event.clientX - box.left) / box.width) * width)));
      const y = Math.min(height - 1, Math.max(0, Math.floor(((event.clientY - box.top) / box.height) * height)));
      const id = ids[y * width + x];
      readout.textContent = id >= 0 ? `${state.card.classes[id].name} (pixel ${x}, ${y})` : `unknown class (pixel ${x}, ${y})`;
      readout.dataset.classId = id;
    });
  }
}

async function segmentFile(file) {
  const section = document.getElementById("result-template").content.firstElementChild.cloneNode(true);
  section.querySelector(".file-name").textContent = file.name;
  document.getElementById("results").prepend(section);
  const status = section.querySelector(".status");
  try {
    await state.ready;
    const response = await fetch("/v1/segment", {
      method: "POST",
      body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    const url = URL.createObjectURL(file);
    section.querySelector(".original").src = url;
    section.querySelector(".under").src = url;
    const canvas = section.querySelector(".labels");
    const labelImg = await loadImage(`data:image/png;base64,${answer.labels_png}`);
    const ids = classIds(labelImg, canvas);
    const slider = section.querySelector(".opacity");
    canvas.style.opacity = slider.value;
    slider.addEventListener("input", () => { canvas.style.opacity = slider.value; });
    fillLegend(section, answer);
    followPointer(section, ids, canvas.width, canvas.height);
    const [h, w] = answer.input_size;
    const t = answer.timing_ms;
    status.textContent = `${w}x${h} · ${answer.classes.length} classes present · inference ${t.inference} ms (batch of ${answer.batch_size}), queue ${t.queue} ms`;
    section.dataset.state = "done";
  } catch (err) {
    status.textContent = `error: ${err.message}`;
    section.dataset.state = "error";
  }
}

function handleFiles(files) {
  for (const file of files) segmentFile(file);
}

function setUp() {
  const input = document.getElementById("file-input");
  input.addEventListener("change", () => { handleFiles(input.files); input.value = ""; });
  const zone = document.getElementById("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    handleFiles(event.dataTransfer.files);
  });
  // a picture dropped anywhere else must not make the browser leave the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  state.ready = loadModelCard().catch((err) => {
    document.getElementById("model-info").textContent = `model card: ${err.message}`;
  });
}

setUp();
