// The MegaSR map editor: one guidance map (seg / depth / hed) over the LR image, painted at the map's own
// resolution. Pixel work is in map_ops.js; this file is the dialog, the tools and the pointer handling.
import { History, Stroke, floodFill, invertGray, levelsGray, nearestClass, toGray } from "./map_ops.js";
import { el, loadPixels, overlay } from "./dom.js";

const TOOLS = {
  seg: [
    ["brush", "Brush"],
    ["fill", "Fill region"],
    ["eyedropper", "Eyedropper"],
    ["pan", "Pan"],
  ],
  depth: [
    ["nearer", "Push nearer"],
    ["farther", "Push farther"],
    ["set", "Set value"],
    ["smooth", "Smooth"],
    ["pan", "Pan"],
  ],
  hed: [
    ["draw", "Draw edges"],
    ["erase", "Erase edges"],
    ["pan", "Pan"],
  ],
};

let paletteCache = null;

/** The ADE20K classes ({index, name, color}) from web/ade20k_palette.json (generated from megasr/dage). */
export async function loadPalette() {
  paletteCache ??= fetch(new URL("../ade20k_palette.json", import.meta.url)).then((r) => r.json());
  return (await paletteCache).classes;
}

export class MapEditor {
  /**
   * @param {object} o
   * @param {"seg"|"depth"|"hed"} o.kind
   * @param {string} o.mapUrl     the map to edit
   * @param {string|null} o.lrUrl the LR image shown beneath (optional)
   * @param {string} o.title
   * @param {(blob: Blob) => Promise<string>} o.onSave  stores the PNG, returns where it went
   * @param {number} [o.opacity]  map opacity over the LR image
   */
  constructor(o) {
    this.o = o;
    this.kind = o.kind;
    this.tool = TOOLS[o.kind][0][0];
    this.size = o.kind === "hed" ? 2 : 6;
    this.hardness = 0.8;
    this.amount = 0.15;
    this.value = 0.5;
    this.zoom = 1;
    this.pan = [0, 0];
    this.history = new History();
    this.dirty = false;
    this.classIndex = 2; // "sky" until the user picks
  }

  async open() {
    const [map, palette] = await Promise.all([loadPixels(this.o.mapUrl), this.kind === "seg" ? loadPalette() : null]);
    this.map = map;
    this.original = new Uint8ClampedArray(map.data);
    this.palette = palette;
    if (this.kind !== "seg") toGray(this.map); // the nodes read gray maps as the channel mean
    this.build();
    this.redraw();
    this.fit();
    return this;
  }

  // --- layout ----------------------------------------------------------------------------------
  build() {
    const { root, bar, close } = overlay(this.o.title, "megasr-map-editor", () => this.o.onClose?.());
    this.root = root;
    this.close = close;
    const button = (label, testid, fn, title) => el("button", { "data-testid": testid, title, onclick: fn }, label);
    this.undoBtn = button("Undo", "megasr-undo", () => this.undo(), "Undo (Ctrl+Z)");
    this.redoBtn = button("Redo", "megasr-redo", () => this.redo(), "Redo (Ctrl+Shift+Z)");
    this.opacity = el("input", { type: "range", min: 0, max: 1, step: 0.05, "data-testid": "megasr-opacity" });
    this.opacity.value = String(this.o.opacity ?? 0.7);
    this.opacity.addEventListener("input", () => (this.canvas.style.opacity = this.opacity.value));
    bar.append(
      this.undoBtn,
      this.redoBtn,
      button("−", "megasr-zoom-out", () => this.zoomBy(1 / 1.25), "Zoom out"),
      button("+", "megasr-zoom-in", () => this.zoomBy(1.25), "Zoom in"),
      button("Fit", "megasr-fit", () => this.fit(), "Fit to window"),
      el("label", { title: "Opacity of the map over the LR image" }, "Map opacity ", this.opacity),
      el("span", { style: { flex: "1" } }),
      button("Save", "megasr-save", () => this.save(), "Save into ComfyUI's input folder (never overwrites)"),
      button("Close", "megasr-close", () => close()),
    );

    this.view = el("div", { class: "megasr-view", "data-testid": "megasr-view" });
    this.stage = el("div", { class: "megasr-stage" });
    const { width, height } = this.map;
    if (this.o.lrUrl) {
      this.lr = el("img", { src: this.o.lrUrl, width, height, alt: "LR image", draggable: "false" });
      this.lr.style.width = `${width}px`;
      this.lr.style.height = `${height}px`;
      this.stage.append(this.lr);
    }
    this.canvas = el("canvas", { width, height, "data-testid": "megasr-map-canvas" });
    this.canvas.style.opacity = this.opacity.value;
    this.ctx = this.canvas.getContext("2d", { willReadFrequently: true });
    this.stage.append(this.canvas);
    this.view.append(this.stage);

    this.status = el("div", { class: "megasr-status", "data-testid": "megasr-status" });
    const body = el("div", { class: "megasr-body" }, this.buildTools(), this.view);
    if (this.kind === "seg") body.append(this.buildClassList());
    root.append(body, this.status);
    this.bindPointer();
    root.addEventListener("keydown", (e) => {
      const mod = e.ctrlKey || e.metaKey;
      if (mod && e.key.toLowerCase() === "z") (e.shiftKey ? this.redo() : this.undo(), e.preventDefault());
      else if (mod && e.key.toLowerCase() === "y") (this.redo(), e.preventDefault());
    });
    this.updateButtons();
  }

  buildTools() {
    const box = el("div", { class: "megasr-tools" });
    this.toolButtons = {};
    for (const [id, label] of TOOLS[this.kind]) {
      const b = el("button", { "data-testid": `megasr-tool-${id}`, onclick: () => this.setTool(id) }, label);
      this.toolButtons[id] = b;
      box.append(b);
    }
    const slider = (label, key, min, max, step, testid) => {
      const input = el("input", { type: "range", min, max, step, "data-testid": testid });
      input.value = String(this[key]);
      const out = el("span", {}, String(this[key]));
      input.addEventListener("input", () => {
        this[key] = Number(input.value);
        out.textContent = input.value;
      });
      return el("label", {}, el("span", {}, label, " ", out), input);
    };
    box.append(slider(this.kind === "hed" ? "Thickness (px)" : "Brush size (px)", "size", 0.5, 64, 0.5, "megasr-size"));
    if (this.kind !== "seg") box.append(slider("Hardness", "hardness", 0, 1, 0.05, "megasr-hardness"));
    if (this.kind === "depth") {
      box.append(slider("Push amount", "amount", 0.01, 1, 0.01, "megasr-amount"));
      box.append(slider("Set value (0 far .. 1 near)", "value", 0, 1, 0.01, "megasr-value"));
      box.append(el("button", { "data-testid": "megasr-invert", onclick: () => this.global((m) => invertGray(m)) }, "Invert"));
      const lv = { inBlack: 0, inWhite: 1, gamma: 1, outBlack: 0, outWhite: 1 };
      const fields = Object.keys(lv).map((k) => {
        const input = el("input", { type: "number", step: 0.05, value: lv[k], "data-testid": `megasr-levels-${k}` });
        input.style.width = "52px";
        input.addEventListener("change", () => (lv[k] = Number(input.value)));
        return el("label", {}, k, input);
      });
      box.append(
        el("div", { style: { display: "flex", flexWrap: "wrap", gap: "4px" } }, fields),
        el("button", { "data-testid": "megasr-levels", onclick: () => this.global((m) => levelsGray(m, lv)) }, "Apply levels"),
      );
    }
    this.setToolHighlight();
    return box;
  }

  buildClassList() {
    const box = el("div", { class: "megasr-classes" });
    const search = el("input", { type: "search", placeholder: "Search 150 ADE20K classes", "data-testid": "megasr-class-search" });
    const list = el("div", { class: "megasr-class-list", "data-testid": "megasr-class-list" });
    this.classRows = this.palette.map((c) => {
      const [r, g, b] = c.color;
      const row = el(
        "div",
        { class: "megasr-class", "data-class": c.name, "data-index": c.index, onclick: () => this.pickClass(c.index) },
        el("span", { class: "megasr-swatch", style: { background: `rgb(${r},${g},${b})` } }),
        el("span", {}, `${c.name}`),
        el("span", { style: { marginLeft: "auto", opacity: ".5" } }, String(c.index)),
      );
      list.append(row);
      return row;
    });
    search.addEventListener("input", () => {
      const q = search.value.trim().toLowerCase();
      for (const row of this.classRows) row.style.display = row.dataset.class.includes(q) ? "" : "none";
    });
    search.addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      const first = this.classRows.find((r) => r.style.display !== "none");
      if (first) this.pickClass(Number(first.dataset.index));
    });
    this.currentClass = el("div", { class: "megasr-status", "data-testid": "megasr-current-class" });
    box.append(search, this.currentClass, list);
    this.pickClass(this.classIndex);
    return box;
  }

  pickClass(index) {
    this.classIndex = index;
    const c = this.palette[index];
    this.classRows?.forEach((r) => r.classList.toggle("megasr-on", Number(r.dataset.index) === index));
    if (this.currentClass) this.currentClass.textContent = `class: ${c.name} (${c.index}) rgb(${c.color.join(", ")})`;
    if (this.tool === "eyedropper") this.setTool("brush");
  }

  setTool(id) {
    this.tool = id;
    this.setToolHighlight();
    if (this.view) this.view.style.cursor = id === "pan" ? "grab" : "crosshair";
  }

  setToolHighlight() {
    for (const [id, b] of Object.entries(this.toolButtons ?? {})) b.classList.toggle("megasr-on", id === this.tool);
  }

  // --- view ------------------------------------------------------------------------------------
  applyTransform() {
    this.stage.style.transform = `translate(${this.pan[0]}px, ${this.pan[1]}px) scale(${this.zoom})`;
  }

  fit() {
    const r = this.view.getBoundingClientRect();
    this.zoom = Math.max(0.05, Math.min(r.width / this.map.width, r.height / this.map.height) * 0.95);
    this.pan = [(r.width - this.map.width * this.zoom) / 2, (r.height - this.map.height * this.zoom) / 2];
    this.applyTransform();
  }

  zoomBy(f, cx, cy) {
    const r = this.view.getBoundingClientRect();
    const x = cx ?? r.width / 2;
    const y = cy ?? r.height / 2;
    const z = Math.min(Math.max(this.zoom * f, 0.05), 64);
    this.pan = [x - ((x - this.pan[0]) * z) / this.zoom, y - ((y - this.pan[1]) * z) / this.zoom];
    this.zoom = z;
    this.applyTransform();
  }

  /** Map pixel coordinates (continuous) under a pointer event. */
  toMap(e) {
    const r = this.view.getBoundingClientRect();
    return [(e.clientX - r.left - this.pan[0]) / this.zoom, (e.clientY - r.top - this.pan[1]) / this.zoom];
  }

  /** Client (page) coordinates of map pixel (x, y)'s centre: what a test moves the mouse to. */
  clientPoint(x, y) {
    const r = this.view.getBoundingClientRect();
    return [r.left + this.pan[0] + (x + 0.5) * this.zoom, r.top + this.pan[1] + (y + 0.5) * this.zoom];
  }

  bindPointer() {
    let panning = null;
    let stroke = null;
    const v = this.view;
    v.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = v.getBoundingClientRect();
      this.zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - r.left, e.clientY - r.top);
    });
    v.addEventListener("contextmenu", (e) => e.preventDefault());
    v.addEventListener("pointerdown", (e) => {
      v.setPointerCapture(e.pointerId);
      if (e.button === 1 || e.button === 2 || this.tool === "pan" || this.spaceDown) {
        panning = [e.clientX - this.pan[0], e.clientY - this.pan[1]];
        return;
      }
      if (e.button !== 0) return;
      const [x, y] = this.toMap(e);
      const px = Math.floor(x);
      const py = Math.floor(y);
      if (this.tool === "eyedropper") return this.eyedrop(px, py);
      if (this.tool === "fill") {
        this.history.push(this.map.data);
        if (floodFill(this.map, px, py, this.palette[this.classIndex].color) > 0) this.changed();
        else this.history.undoStack.pop();
        return;
      }
      this.history.push(this.map.data);
      stroke = new Stroke(this.map, this.strokeOp());
      stroke.to(x, y, this.size / 2, this.hardness);
      this.redraw();
    });
    v.addEventListener("pointermove", (e) => {
      if (panning) {
        this.pan = [e.clientX - panning[0], e.clientY - panning[1]];
        this.applyTransform();
        return;
      }
      const [x, y] = this.toMap(e);
      this.hover(Math.floor(x), Math.floor(y));
      if (stroke) {
        stroke.to(x, y, this.size / 2, this.hardness);
        this.redraw();
      }
    });
    const end = () => {
      if (stroke) this.changed();
      stroke = null;
      panning = null;
    };
    v.addEventListener("pointerup", end);
    v.addEventListener("pointercancel", end);
    this.root.addEventListener("keydown", (e) => e.code === "Space" && (this.spaceDown = true));
    this.root.addEventListener("keyup", (e) => e.code === "Space" && (this.spaceDown = false));
  }

  strokeOp() {
    if (this.kind === "seg") return { kind: "seg", color: this.palette[this.classIndex].color };
    return { kind: "gray", mode: this.tool, amount: this.amount, value: this.value };
  }

  pixel(x, y) {
    if (x < 0 || y < 0 || x >= this.map.width || y >= this.map.height) return null;
    const p = (y * this.map.width + x) * 4;
    return [this.map.data[p], this.map.data[p + 1], this.map.data[p + 2]];
  }

  hover(x, y) {
    const px = this.pixel(x, y);
    if (!px) return (this.status.textContent = "");
    if (this.kind === "seg") {
      const { index, exact } = nearestClass(this.palette.map((c) => c.color), ...px);
      const name = this.palette[index].name;
      this.status.textContent = `(${x}, ${y}) ${name}${exact ? "" : ` (nearest; pixel rgb(${px.join(", ")}))`}`;
    } else {
      const what = this.kind === "depth" ? "depth (near = 1)" : "edge";
      this.status.textContent = `(${x}, ${y}) ${what} ${(px[0] / 255).toFixed(3)}`;
    }
  }

  eyedrop(x, y) {
    const px = this.pixel(x, y);
    if (!px) return;
    this.pickClass(nearestClass(this.palette.map((c) => c.color), ...px).index);
  }

  global(fn) {
    this.history.push(this.map.data);
    fn(this.map);
    this.changed();
  }

  changed() {
    this.dirty = true;
    this.redraw();
    this.updateButtons();
  }

  undo() {
    if (this.history.undo(this.map)) this.changed();
  }

  redo() {
    if (this.history.redo(this.map)) this.changed();
  }

  updateButtons() {
    if (!this.undoBtn) return;
    this.undoBtn.disabled = !this.history.undoStack.length;
    this.redoBtn.disabled = !this.history.redoStack.length;
  }

  redraw() {
    if (!this.ctx) return;
    this.ctx.putImageData(new ImageData(new Uint8ClampedArray(this.map.data), this.map.width, this.map.height), 0, 0);
  }

  /** Pixels as they are now (tests compare them with the saved file). */
  pixels() {
    return Array.from(this.map.data);
  }

  async save() {
    const blob = await new Promise((resolve) => this.canvas.toBlob(resolve, "image/png"));
    this.status.textContent = "saving…";
    try {
      const where = await this.o.onSave(blob);
      this.dirty = false;
      this.savedAs = where;
      this.status.textContent = `saved as ${where} (the graph now uses it)`;
      this.root.dataset.saved = where;
      return where;
    } catch (err) {
      this.status.textContent = `not saved: ${err?.message ?? err}`;
      throw err;
    }
  }
}
