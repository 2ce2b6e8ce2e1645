"""Render the Mandelbrot set as a 640x480 greyscale image, computed in 48 tiles of 80x80.

Each job computes one tile in pure Python (escape-time iteration, up to 200 iterations per
pixel) and returns its position and its 8-bit grey pixels as bytes. The sink runs in the
supervisor: it places every tile it receives into the image, and when its count of tiles reaches
the total it writes ``mandelbrot.pgm`` (binary PGM, "P5") into the current directory. The image
shows the whole set, the region -2.2 <= re <= 1.0, -1.2 <= im <= 1.2: points inside the set are
black, points outside are brighter the longer they take to escape, so the set's filigree edge
glows against a dark background.

    batchpool run pipelines/mandelbrot.py --procs 2
    python pipelines/mandelbrot.py                  # the same run from the Python API

Either way it prints what it wrote. ``MANDELBROT_TILE=20`` renders a 160x120 image instead
(tiles of 20x20), for a quick try.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from batchpool import Pipeline, Task

TILE_W = TILE_H = int(os.environ.get("MANDELBROT_TILE", "80"))
WIDTH, HEIGHT = 8 * TILE_W, 6 * TILE_H  # 8 x 6 tiles
RE_MIN, RE_MAX = -2.2, 1.0
IM_MIN, IM_MAX = -1.2, 1.2
MAX_ITER = 200
OUTPUT = "mandelbrot.pgm"

TILES = [(x, y) for y in range(0, HEIGHT, TILE_H) for x in range(0, WIDTH, TILE_W)]


class Tile(Task):
    """One tile: ``(x0, y0)`` -> ``(x0, y0, bytes of TILE_W * TILE_H grey levels)``."""

    retries = 1

    def run(self, origin: tuple[int, int]) -> tuple[int, int, bytes]:
        x0, y0 = origin
        dx = (RE_MAX - RE_MIN) / WIDTH
        dy = (IM_MAX - IM_MIN) / HEIGHT
        pixels = bytearray(TILE_W * TILE_H)
        i = 0
        for py in range(y0, y0 + TILE_H):
            ci = IM_MAX - py * dy
            for px in range(x0, x0 + TILE_W):
                cr = RE_MIN + px * dx
                zr = zi = 0.0
                n = 0
                while n < MAX_ITER:
                    zr2, zi2 = zr * zr, zi * zi
                    if zr2 + zi2 > 4.0:
                        break
                    zi = 2.0 * zr * zi + ci
                    zr = zr2 - zi2 + cr
                    n += 1
                # Inside the set: black; outside: brighter the longer the point took to escape.
                pixels[i] = 0 if n == MAX_ITER else 40 + int(215 * (n / MAX_ITER) ** 0.4)
                i += 1
        return x0, y0, bytes(pixels)


class Canvas:
    """The sink: assembles tiles in the supervisor, writes the PGM once the last one arrives."""

    def __init__(self, path: str = OUTPUT) -> None:
        self.path = path
        self.image = bytearray(WIDTH * HEIGHT)
        self.done: set[tuple[int, int]] = set()
        self.failed = 0

    def __call__(self, result) -> None:
        if not result.ok:
            self.failed += 1
        else:
            x0, y0, pixels = result.value
            for row in range(TILE_H):
                start = (y0 + row) * WIDTH + x0
                self.image[start : start + TILE_W] = pixels[row * TILE_W : (row + 1) * TILE_W]
            self.done.add((x0, y0))
        if len(self.done) + self.failed < len(TILES):
            return
        if self.failed:
            print(f"{self.failed} of {len(TILES)} tiles failed: {self.path} not written")
            return
        header = f"P5\n{WIDTH} {HEIGHT}\n255\n".encode("ascii")
        Path(self.path).write_bytes(header + bytes(self.image))
        print(f"wrote {self.path}: {WIDTH}x{HEIGHT} pixels in {len(TILES)} tiles")


canvas = Canvas()
pipeline = Pipeline(TILES, Tile(), name="mandelbrot", sink=canvas)

if __name__ == "__main__":  # required: workers import this file again to find Tile
    report = pipeline.run()
    sys.exit(1 if report.failed or report.error else 0)
