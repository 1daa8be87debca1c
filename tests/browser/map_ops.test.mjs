// Unit tests of web/lib/map_ops.js (node's own test runner; tests/web/test_browser_map_ops.py runs it).
import assert from "node:assert/strict";
import test from "node:test";
import fs from "node:fs";
import {
  History,
  Stroke,
  bicubicResize,
  floodFill,
  levelsGray,
  nearestClass,
  invertGray,
} from "../../web/lib/map_ops.js";

const palette = JSON.parse(fs.readFileSync(new URL("../../web/ade20k_palette.json", import.meta.url))).classes;
const colors = palette.map((c) => c.color);

function makeMap(w, h, rgb) {
  const data = new Uint8ClampedArray(w * h * 4);
  for (let i = 0; i < w * h; i++) data.set([...rgb(i % w, Math.floor(i / w)), 255], i * 4);
  return { width: w, height: h, data };
}
const px = (m, x, y) => Array.from(m.data.slice((y * m.width + x) * 4, (y * m.width + x) * 4 + 3));

test("seg brush writes exactly the class colour inside the disc and nothing else (no anti-aliasing)", () => {
  // catches: canvas-style anti-aliased edges, a stroke offset by half a pixel, hardness applied to seg
  const wall = colors[0];
  const sky = colors[2];
  const m = makeMap(21, 15, () => wall);
  const s = new Stroke(m, { kind: "seg", color: sky });
  s.to(10.5, 7.5, 3, 0.1); // a soft brush: seg ignores hardness
  for (let y = 0; y < 15; y++) {
    for (let x = 0; x < 21; x++) {
      const inside = Math.hypot(x + 0.5 - 10.5, y + 0.5 - 7.5) <= 3;
      assert.deepEqual(px(m, x, y), inside ? sky : wall, `pixel ${x},${y}`);
    }
  }
});

test("a dragged stroke covers the segment between the points and repeats no base pile-up", () => {
  // catches: gaps between pointer events, gray strokes compounding while the pointer stays put
  const m = makeMap(30, 5, () => [100, 100, 100]);
  const s = new Stroke(m, { kind: "gray", mode: "nearer", amount: 0.2 });
  s.to(2.5, 2.5, 1, 1);
  for (let i = 0; i < 5; i++) s.to(27.5, 2.5, 1, 1);
  for (let x = 2; x <= 27; x++) assert.equal(px(m, x, 2)[0], 100 + Math.round(0.2 * 255), `x=${x}`);
  assert.equal(px(m, 0, 0)[0], 100);
});

test("depth modes: set, farther clamps, hardness falls off, smooth moves towards neighbours", () => {
  const m = makeMap(11, 11, () => [200, 200, 200]);
  new Stroke(m, { kind: "gray", mode: "set", value: 0.0 }).to(5.5, 5.5, 4, 0.5);
  assert.equal(px(m, 5, 5)[0], 0); // centre: full weight
  const edge = px(m, 5, 2)[0]; // d = 3 of r = 4, hardness .5 -> weight .5
  assert.equal(edge, 100);
  assert.equal(px(m, 0, 0)[0], 200);
  const f = makeMap(3, 3, () => [10, 10, 10]);
  new Stroke(f, { kind: "gray", mode: "farther", amount: 0.5 }).to(1.5, 1.5, 0.6, 1);
  assert.equal(px(f, 1, 1)[0], 0);
  const sm = makeMap(5, 5, (x) => (x === 2 ? [255, 255, 255] : [0, 0, 0]));
  new Stroke(sm, { kind: "gray", mode: "smooth" }).to(2.5, 2.5, 0.6, 1);
  assert.ok(px(sm, 2, 2)[0] < 255 && px(sm, 2, 2)[0] > 0);
  assert.equal(px(sm, 1, 2)[0], 0);
});

test("hed draw and erase; invert and levels", () => {
  const m = makeMap(5, 5, () => [0, 0, 0]);
  new Stroke(m, { kind: "gray", mode: "draw" }).to(2.5, 2.5, 0.6, 1);
  assert.deepEqual(px(m, 2, 2), [255, 255, 255]);
  new Stroke(m, { kind: "gray", mode: "erase" }).to(2.5, 2.5, 0.6, 1);
  assert.deepEqual(px(m, 2, 2), [0, 0, 0]);
  const g = makeMap(2, 1, (x) => (x ? [51, 51, 51] : [204, 204, 204]));
  invertGray(g);
  assert.deepEqual([px(g, 0, 0)[0], px(g, 1, 0)[0]], [51, 204]);
  levelsGray(g, { inBlack: 0.2, inWhite: 0.8 });
  assert.deepEqual([px(g, 0, 0)[0], px(g, 1, 0)[0]], [0, 255]);
});

test("fill changes exactly the 4-connected region of one colour; eyedropper finds the class", () => {
  const a = colors[4]; // tree
  const b = colors[12]; // person
  const m = makeMap(6, 3, (x, y) => (x === 3 || (x > 3 && y === 1) ? b : a));
  const n = floodFill(m, 0, 0, colors[2]);
  assert.equal(n, 9);
  assert.deepEqual(px(m, 5, 0), a); // same colour, not connected
  assert.deepEqual(px(m, 2, 2), colors[2]);
  assert.equal(nearestClass(colors, ...colors[2]).index, 2);
  assert.equal(palette[nearestClass(colors, 7, 229, 231).index].name, "sky");
  assert.equal(nearestClass(colors, 7, 229, 231).exact, false);
});

test("undo restores the map bit for bit, redo re-applies", () => {
  const m = makeMap(4, 4, () => colors[0]);
  const before = new Uint8ClampedArray(m.data);
  const h = new History();
  h.push(m.data);
  new Stroke(m, { kind: "seg", color: colors[2] }).to(2, 2, 1.5, 1);
  const after = new Uint8ClampedArray(m.data);
  assert.notDeepEqual(after, before);
  h.undo(m);
  assert.deepEqual(m.data, before);
  h.redo(m);
  assert.deepEqual(m.data, after);
});

test("bicubic upscale: constant stays constant, x2 of a step matches torch's bicubic (align_corners=False)", () => {
  const c = bicubicResize(new Uint8ClampedArray(2 * 2 * 4).fill(77), 2, 2, 5, 3);
  assert.ok(c.every((v) => v === 77));
  // torch: F.interpolate(tensor([[0, 0, 255, 255]]), scale_factor=2, mode="bicubic") row
  // (size=(1, 8)) = [0, -8.96, -26.89, 57.77, 197.23, 281.89, 263.96, 255] -> clamped and rounded
  const src = new Uint8ClampedArray([0, 0, 255, 255].flatMap((v) => [v, v, v, 255]));
  const out = bicubicResize(src, 4, 1, 8, 1);
  const row = [];
  for (let i = 0; i < 8; i++) row.push(out[i * 4]);
  assert.deepEqual(row, [0, 0, 0, 58, 197, 255, 255, 255]);
});
