// Pixel operations of the MegaSR map editor, on plain RGBA arrays (no DOM, so node can test them).
// A map is { width, height, data: Uint8ClampedArray RGBA }. HED and depth maps are gray (R = G = B);
// segmentation maps hold ADE20K palette colours, written exactly (never blended across classes).

/** Brush weight at distance `d` from the centre: 1 inside `hardness * radius`, falling linearly to 0 at `radius`. */
export function brushWeight(d, radius, hardness) {
  if (d > radius) return 0;
  const inner = radius * Math.min(Math.max(hardness, 0), 1);
  if (d <= inner || radius - inner < 1e-6) return 1;
  return (radius - d) / (radius - inner);
}

/** Pixel centres (x + .5, y + .5) the disc of `radius` around (cx, cy) covers, with their brush weights. */
export function stampWeights(width, height, cx, cy, radius, hardness, visit) {
  const r = Math.max(radius, 0.5);
  const x0 = Math.max(0, Math.floor(cx - r));
  const x1 = Math.min(width - 1, Math.ceil(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r));
  const y1 = Math.min(height - 1, Math.ceil(cy + r));
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const d = Math.hypot(x + 0.5 - cx, y + 0.5 - cy);
      const w = brushWeight(d, r, hardness);
      if (w > 0) visit(y * width + x, w);
    }
  }
}

/** Points along a segment, at most `spacing` apart, from (ax, ay) (excluded) to (bx, by) (included). */
export function segmentPoints(ax, ay, bx, by, spacing) {
  const n = Math.max(1, Math.ceil(Math.hypot(bx - ax, by - ay) / Math.max(spacing, 0.25)));
  const out = [];
  for (let i = 1; i <= n; i++) out.push([ax + ((bx - ax) * i) / n, ay + ((by - ay) * i) / n]);
  return out;
}

/**
 * One stroke: a mask of the largest brush weight each pixel got, applied to the map as it was when the stroke
 * began (so a slow stroke does not pile up). `apply(base, mask)` recomputes the map from the two.
 */
export class Stroke {
  constructor(map, op) {
    this.map = map;
    this.op = op; // { kind: "seg" | "gray", ... } see applyStroke
    this.base = new Uint8ClampedArray(map.data);
    this.mask = new Float32Array(map.width * map.height);
    this.last = null;
  }

  to(x, y, radius, hardness) {
    const pts = this.last ? segmentPoints(this.last[0], this.last[1], x, y, Math.max(radius / 4, 0.5)) : [[x, y]];
    const hard = this.op.kind === "seg" ? 1 : hardness;
    for (const [px, py] of pts) {
      stampWeights(this.map.width, this.map.height, px, py, radius, hard, (i, w) => {
        if (w > this.mask[i]) this.mask[i] = w;
      });
    }
    this.last = [x, y];
    applyStroke(this.map, this.base, this.mask, this.op);
  }
}

function clamp255(v) {
  return v < 0 ? 0 : v > 255 ? 255 : Math.round(v);
}

/** 3x3 (or wider) box blur of the gray channel of `data`, as Float32Array. */
export function boxBlurGray(data, width, height, radius = 2) {
  const out = new Float32Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      let s = 0;
      let n = 0;
      for (let dy = -radius; dy <= radius; dy++) {
        const yy = y + dy;
        if (yy < 0 || yy >= height) continue;
        for (let dx = -radius; dx <= radius; dx++) {
          const xx = x + dx;
          if (xx < 0 || xx >= width) continue;
          s += data[(yy * width + xx) * 4];
          n++;
        }
      }
      out[y * width + x] = s / n;
    }
  }
  return out;
}

/**
 * Writes base + op(mask) into map.data. Ops:
 *   seg:   { kind: "seg", color: [r, g, b] }   pixels with mask > 0 become exactly `color`
 *   gray:  { kind: "gray", mode, amount, value }   mode: "draw" (towards white), "erase" (towards black),
 *          "nearer" / "farther" (+/- amount * 255), "set" (towards value 0..1), "smooth" (towards a box blur)
 */
export function applyStroke(map, base, mask, op) {
  const d = map.data;
  const blurred = op.kind === "gray" && op.mode === "smooth" ? (op._blur ??= boxBlurGray(base, map.width, map.height)) : null;
  for (let i = 0; i < mask.length; i++) {
    const m = mask[i];
    const p = i * 4;
    if (m <= 0) {
      d[p] = base[p];
      d[p + 1] = base[p + 1];
      d[p + 2] = base[p + 2];
      d[p + 3] = base[p + 3];
      continue;
    }
    if (op.kind === "seg") {
      d[p] = op.color[0];
      d[p + 1] = op.color[1];
      d[p + 2] = op.color[2];
      d[p + 3] = 255;
      continue;
    }
    const v = base[p];
    let t;
    switch (op.mode) {
      case "draw":
        t = v + (255 - v) * m;
        break;
      case "erase":
        t = v * (1 - m);
        break;
      case "nearer":
        t = v + op.amount * 255 * m;
        break;
      case "farther":
        t = v - op.amount * 255 * m;
        break;
      case "set":
        t = v + (op.value * 255 - v) * m;
        break;
      case "smooth":
        t = v + (blurred[i] - v) * m;
        break;
      default:
        throw new Error(`unknown brush mode ${op.mode}`);
    }
    const g = clamp255(t);
    d[p] = g;
    d[p + 1] = g;
    d[p + 2] = g;
    d[p + 3] = 255;
  }
}

/** 4-connected flood fill of the region of exactly the colour at (x, y) with `color`; returns pixels changed. */
export function floodFill(map, x, y, color) {
  const { width, height, data } = map;
  if (x < 0 || y < 0 || x >= width || y >= height) return 0;
  const start = (y * width + x) * 4;
  const from = [data[start], data[start + 1], data[start + 2]];
  if (from[0] === color[0] && from[1] === color[1] && from[2] === color[2]) return 0;
  const same = (i) => data[i * 4] === from[0] && data[i * 4 + 1] === from[1] && data[i * 4 + 2] === from[2];
  const stack = [y * width + x];
  let n = 0;
  while (stack.length) {
    const i = stack.pop();
    if (!same(i)) continue;
    const p = i * 4;
    data[p] = color[0];
    data[p + 1] = color[1];
    data[p + 2] = color[2];
    data[p + 3] = 255;
    n++;
    const px = i % width;
    if (px > 0) stack.push(i - 1);
    if (px < width - 1) stack.push(i + 1);
    if (i >= width) stack.push(i - width);
    if (i < width * (height - 1)) stack.push(i + width);
  }
  return n;
}

/** Index of the palette colour nearest to (r, g, b) and whether it is an exact match. */
export function nearestClass(palette, r, g, b) {
  let best = 0;
  let bestD = Infinity;
  for (let k = 0; k < palette.length; k++) {
    const c = palette[k];
    const dd = (c[0] - r) ** 2 + (c[1] - g) ** 2 + (c[2] - b) ** 2;
    if (dd < bestD) {
      bestD = dd;
      best = k;
    }
  }
  return { index: best, exact: bestD === 0 };
}

/** Gray map -> 255 - value. */
export function invertGray(map) {
  const d = map.data;
  for (let p = 0; p < d.length; p += 4) {
    const g = 255 - d[p];
    d[p] = g;
    d[p + 1] = g;
    d[p + 2] = g;
  }
}

/**
 * Levels on a gray map (values 0..1): input black/white points, gamma, output black/white points.
 * v' = outBlack + (outWhite - outBlack) * clamp((v - inBlack) / (inWhite - inBlack)) ** (1 / gamma)
 */
export function levelsGray(map, { inBlack = 0, inWhite = 1, gamma = 1, outBlack = 0, outWhite = 1 } = {}) {
  const d = map.data;
  const span = Math.max(inWhite - inBlack, 1e-6);
  const lut = new Uint8ClampedArray(256);
  for (let v = 0; v < 256; v++) {
    const t = Math.min(Math.max((v / 255 - inBlack) / span, 0), 1) ** (1 / Math.max(gamma, 1e-3));
    lut[v] = clamp255((outBlack + (outWhite - outBlack) * t) * 255);
  }
  for (let p = 0; p < d.length; p += 4) {
    const g = lut[d[p]];
    d[p] = g;
    d[p + 1] = g;
    d[p + 2] = g;
  }
}

/** Gray maps keep R = G = B (a map read from a colour file is made gray by its channel mean, as the nodes do). */
export function toGray(map) {
  const d = map.data;
  for (let p = 0; p < d.length; p += 4) {
    const g = Math.round((d[p] + d[p + 1] + d[p + 2]) / 3);
    d[p] = g;
    d[p + 1] = g;
    d[p + 2] = g;
    d[p + 3] = 255;
  }
}

/**
 * Bicubic resampling (Keys, a = -0.75, edge pixels repeated, pixel centres aligned as in
 * torch's interpolate(mode="bicubic", align_corners=False)) of RGBA data to (outW, outH).
 */
export function bicubicResize(src, srcW, srcH, outW, outH) {
  const out = new Uint8ClampedArray(outW * outH * 4);
  const a = -0.75; // torch uses A = -0.75 (PIL -0.5)
  const k = (x) => {
    const t = Math.abs(x);
    if (t <= 1) return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1;
    if (t < 2) return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a;
    return 0;
  };
  const taps = (outN, srcN) => {
    const scale = srcN / outN;
    const res = [];
    for (let o = 0; o < outN; o++) {
      const c = (o + 0.5) * scale - 0.5;
      const f = Math.floor(c);
      const idx = [];
      const w = [];
      for (let j = -1; j <= 2; j++) {
        idx.push(Math.min(Math.max(f + j, 0), srcN - 1));
        w.push(k(c - (f + j)));
      }
      res.push({ idx, w });
    }
    return res;
  };
  const tx = taps(outW, srcW);
  const ty = taps(outH, srcH);
  const rows = new Float32Array(srcH * outW * 4); // horizontal pass
  for (let y = 0; y < srcH; y++) {
    for (let x = 0; x < outW; x++) {
      const { idx, w } = tx[x];
      for (let c = 0; c < 4; c++) {
        let s = 0;
        for (let j = 0; j < 4; j++) s += src[(y * srcW + idx[j]) * 4 + c] * w[j];
        rows[(y * outW + x) * 4 + c] = s;
      }
    }
  }
  for (let y = 0; y < outH; y++) {
    const { idx, w } = ty[y];
    for (let x = 0; x < outW; x++) {
      for (let c = 0; c < 4; c++) {
        let s = 0;
        for (let j = 0; j < 4; j++) s += rows[(idx[j] * outW + x) * 4 + c] * w[j];
        out[(y * outW + x) * 4 + c] = s;
      }
    }
  }
  return out;
}

/** Undo/redo of whole-map snapshots (maps are small: a 1024 px map is 4 MB; 40 steps are kept). */
export class History {
  constructor(limit = 40) {
    this.limit = limit;
    this.undoStack = [];
    this.redoStack = [];
  }

  push(data) {
    this.undoStack.push(new Uint8ClampedArray(data));
    if (this.undoStack.length > this.limit) this.undoStack.shift();
    this.redoStack = [];
  }

  undo(map) {
    if (!this.undoStack.length) return false;
    this.redoStack.push(new Uint8ClampedArray(map.data));
    map.data.set(this.undoStack.pop());
    return true;
  }

  redo(map) {
    if (!this.redoStack.length) return false;
    this.undoStack.push(new Uint8ClampedArray(map.data));
    map.data.set(this.redoStack.pop());
    return true;
  }
}
