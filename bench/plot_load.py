"""Expert load per MoE layer over training steps, as a PNG: python bench/plot_load.py metrics.jsonl [-o load.png]
[--bound 2 --after 20]

Reads the JSONL that train.py writes (train.log_file, or <ckpt_dir>/metrics.jsonl) and draws one panel per MoE
layer: the most loaded expert relative to the mean (load_max, red), the least loaded (load_min, blue) and, where
logged, the normalized entropy of the load distribution (load_entropy, green; 1 = uniform). Grey lines mark 1x
and 2x the mean. The PNG is written with numpy and zlib only (a 5x7 bitmap font for the labels), so the script
runs wherever the trainer does. It also prints, per layer, the step from which load_max stays within --bound and
the worst load_max after --after (the acceptance check of issue #9: <= 2x the mean after the warmup).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import zlib

import numpy as np

RED, BLUE, GREEN, GREY, BLACK = (200, 30, 30), (30, 70, 200), (20, 150, 60), (175, 175, 175), (0, 0, 0)
PANEL_W, PANEL_H, MARGIN_L, MARGIN_B, MARGIN_T, COLS = 420, 220, 44, 22, 18, 3

# 5x7 glyphs, one string of 7 rows per character ('#' = ink).
_GLYPHS = {
    "0": "01110100011001110101110011000101110", "1": "00100011000010000100001000010001110",
    "2": "01110100010000100010001000100011111", "3": "11111000100010000010000011000101110",
    "4": "00010001100101010010111110001000010", "5": "11111100001111000001000011000101110",
    "6": "00110010001000011110100011000101110", "7": "11111000010001000100010000100001000",
    "8": "01110100011000101110100011000101110", "9": "01110100011000101111000010001001100",
    ".": "00000000000000000000000000110001100", "-": "00000000000000011111000000000000000",
    "X": "10001100010101000100010101000110001", " ": "0" * 35, "=": "00000000001111100000111110000000000",
    "(": "00010001000100001000010000010000010", ")": "01000001000001000010000100010001000",
    ",": "00000000000000000000001100010001000", "/": "00001000010001000100010001000010000", ":": "00000011000110000000011000110000000",
}
_LETTERS = {
    "A": "01110100011000111111100011000110001", "B": "11110100011000111110100011000111110",
    "C": "01110100011000010000100001000101110", "D": "11100100101000110001100011001011100",
    "E": "11111100001000011110100001000011111", "F": "11111100001000011110100001000010000",
    "G": "01110100011000010111100011000101111", "H": "10001100011000111111100011000110001",
    "I": "01110001000010000100001000010001110", "K": "10001100101010011000101001001010001",
    "L": "10000100001000010000100001000011111", "M": "10001110111010110101100011000110001",
    "N": "10001100011100110101100111000110001", "O": "01110100011000110001100011000101110",
    "P": "11110100011000111110100001000010000", "R": "11110100011000111110101001001010001",
    "S": "01111100001000001110000010000111110", "T": "11111001000010000100001000010000100",
    "U": "10001100011000110001100011000101110", "W": "10001100011000110101101011010101010",
    "V": "10001100011000110001100010101000100", "Y": "10001100011000101010001000010000100",
    "Z": "11111000010001000100010001000011111",
}
_GLYPHS.update(_LETTERS)


def load_records(path: pathlib.Path) -> list[dict]:
  """Train-log lines of a metrics JSONL that carry per-layer load metrics, in step order."""
  if not path.is_file():
    raise ValueError(f"metrics file not found: {path}")
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    if isinstance(rec.get("load_max"), list) and "step" in rec:
      rows.append(rec)
  if not rows:
    raise ValueError(f"{path}: no lines with per-layer 'load_max' (is this a train.py metrics file of an MoE model?)")
  rows.sort(key=lambda r: r["step"])
  return rows


def series(rows: list[dict], key: str) -> np.ndarray | None:
  """[n_steps, n_layers] array of a per-layer metric, or None if no line has it."""
  if not all(isinstance(r.get(key), list) for r in rows):
    return None
  return np.asarray([r[key] for r in rows], dtype=np.float64)


class Canvas:
  def __init__(self, w: int, h: int):
    self.px = np.full((h, w, 3), 255, np.uint8)

  def line(self, x0, y0, x1, y1, color, width=1):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs, ys = np.linspace(x0, x1, n).round().astype(int), np.linspace(y0, y1, n).round().astype(int)
    h, w, _ = self.px.shape
    for dx in range(width):
      for dy in range(width):
        ok = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
        self.px[ys[ok] + dy, xs[ok] + dx] = color

  def polyline(self, xs, ys, color, width=2):
    for i in range(len(xs) - 1):
      self.line(xs[i], ys[i], xs[i + 1], ys[i + 1], color, width)
    if len(xs) == 1:
      self.line(xs[0], ys[0], xs[0], ys[0], color, width + 1)

  def text(self, x: int, y: int, s: str, color=BLACK):
    for i, ch in enumerate(s.upper()):
      glyph = _GLYPHS.get(ch, _GLYPHS[" "])
      bits = np.array([c == "1" for c in glyph]).reshape(7, 5)
      ys, xs = np.nonzero(bits)
      ok = (y + ys < self.px.shape[0]) & (x + i * 6 + xs < self.px.shape[1])
      self.px[(y + ys)[ok], (x + i * 6 + xs)[ok]] = color

  def png(self) -> bytes:
    h, w, _ = self.px.shape
    raw = b"".join(b"\x00" + self.px[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
      return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _fmt(v: float) -> str:
  return f"{v:.0f}" if v == int(v) else f"{v:.1f}"


def render(rows: list[dict]) -> bytes:
  steps = np.asarray([r["step"] for r in rows], np.float64)
  lmax, lmin, ent = series(rows, "load_max"), series(rows, "load_min"), series(rows, "load_entropy")
  n_layers = lmax.shape[1]
  cols = min(COLS, n_layers)
  n_rows = -(-n_layers // cols)
  cv = Canvas(cols * PANEL_W, n_rows * PANEL_H + 16)
  cv.text(6, 4, "expert load / mean per moe layer:  max (red)  min (blue)  entropy (green)  grey: 1x 2x")
  y_top = max(2.5, float(np.nanmax(lmax)) * 1.05)
  s0, s1 = float(steps.min()), float(max(steps.max(), steps.min() + 1))
  for layer in range(n_layers):
    ox, oy = (layer % cols) * PANEL_W, 16 + (layer // cols) * PANEL_H
    x0, x1 = ox + MARGIN_L, ox + PANEL_W - 10
    y0, y1 = oy + PANEL_H - MARGIN_B, oy + MARGIN_T          # pixel rows of value 0 and y_top

    def px_x(s):
      return x0 + (np.asarray(s) - s0) / (s1 - s0) * (x1 - x0)

    def px_y(v):
      return y0 - np.clip(np.asarray(v), 0, y_top) / y_top * (y0 - y1)

    for ref in (1.0, 2.0):
      cv.line(x0, px_y(ref), x1, px_y(ref), GREY)
    cv.line(x0, y0, x1, y0, BLACK)
    cv.line(x0, y0, x0, y1, BLACK)
    for tick in sorted({0.0, 1.0, 2.0, round(y_top, 1)}):
      cv.text(ox + 4, int(px_y(tick)) - 3, _fmt(tick))
    for tick in (s0, (s0 + s1) / 2, s1):
      label = f"{tick:.0f}"
      cv.text(int(px_x(tick)) - 3 * len(label), y0 + 6, label)
    cv.text(x0 + 6, oy + 4, f"layer {layer}")
    if ent is not None:
      cv.polyline(px_x(steps), px_y(ent[:, layer]), GREEN)
    cv.polyline(px_x(steps), px_y(lmin[:, layer]), BLUE)
    cv.polyline(px_x(steps), px_y(lmax[:, layer]), RED)
  return cv.png()


def summary(rows: list[dict], bound: float, after: int) -> list[str]:
  """Per layer: the step from which load_max stays <= bound to the end of the log, and the worst load_max
  logged after step `after` (e.g. the warmup)."""
  steps, lmax = np.asarray([r["step"] for r in rows]), series(rows, "load_max")
  lines = []
  for layer in range(lmax.shape[1]):
    over = np.nonzero(lmax[:, layer] > bound)[0]
    since = steps[0] if not len(over) else (steps[over[-1] + 1] if over[-1] + 1 < len(steps) else None)
    late = lmax[steps > after, layer]
    worst = f"{late.max():.2f}" if len(late) else "n/a"
    lines.append(f"layer {layer}: load_max <= {bound:g} " + (f"from step {since} on" if since is not None else
                 "not reached by the last step") + f"; max after step {after}: {worst}")
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("metrics", type=pathlib.Path, help="metrics JSONL written by train.py")
  p.add_argument("-o", "--out", type=pathlib.Path, default=None, help="PNG path (default: load.png next to metrics)")
  p.add_argument("--bound", type=float, default=2.0, help="load_max bound for the printed summary (default 2)")
  p.add_argument("--after", type=int, default=0, help="summary: worst load_max after this step (e.g. warmup)")
  args = p.parse_args(argv)
  try:
    rows = load_records(args.metrics)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = args.out or args.metrics.with_name("load.png")
  out.write_bytes(render(rows))
  print(f"wrote {out} ({len(rows)} steps, {len(rows[0]['load_max'])} MoE layers)")
  print("\n".join(summary(rows, args.bound, args.after)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
