"""Per-step pictures: a strip of chosen steps and an animated GIF of the moving image warping onto the fixed one.

Each frame shows [fixed | warped at step k | |fixed - warped|] on the central slice (axial for 3D: array
axis 0). Only that slice is kept per step, so recording a long run costs little memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_file

__all__ = ["StepPictures"]


def _central_slice(volume) -> np.ndarray:
    array = volume.detach().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
    array = array.reshape(array.shape[-3:] if array.ndim >= 3 and array.shape[-3] > 1 else array.shape[-2:])
    if array.ndim == 3:
        array = array[array.shape[0] // 2]
    return np.flipud(array)  # array row 0 is posterior/inferior; show anterior up like a radiological view


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0, 1) * 255).astype(np.uint8)


class StepPictures:
    """Collects the central slice of every step; writes a PNG strip and a GIF."""

    def __init__(self, fixed, scale: int = 3):
        self.fixed = _central_slice(fixed)
        self.scale = scale
        self.slices: list[np.ndarray] = []
        self.labels: list[str] = []

    def add(self, warped, label: str) -> None:
        self.slices.append(_central_slice(warped))
        self.labels.append(label)

    def _frame(self, i: int) -> Image.Image:
        warped = self.slices[i]
        diff = np.abs(self.fixed - warped)
        panel = np.concatenate([self.fixed, warped, diff], axis=1)
        image = Image.fromarray(_to_uint8(panel)).convert("RGB")
        image = image.resize((image.width * self.scale, image.height * self.scale), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        w = self.fixed.shape[1] * self.scale
        for x, text in ((2, "fixed"), (w + 2, self.labels[i]), (2 * w + 2, "|difference|")):
            draw.text((x, 2), text, fill=(255, 200, 0))
        return image

    def chosen(self, count: int = 6) -> list[int]:
        n = len(self.slices)
        return sorted(set(np.linspace(0, n - 1, num=min(count, n)).round().astype(int).tolist()))

    def write_strip(self, path: str | Path, count: int = 6) -> None:
        frames = [self._frame(i) for i in self.chosen(count)]
        strip = Image.new("RGB", (frames[0].width, sum(f.height for f in frames)))
        y = 0
        for frame in frames:
            strip.paste(frame, (0, y))
            y += frame.height
        with atomic_file(path) as tmp:
            strip.save(tmp, format="PNG")

    def write_gif(self, path: str | Path, max_frames: int = 40, ms_per_frame: int = 120) -> None:
        frames = [self._frame(i) for i in self.chosen(max_frames)]
        with atomic_file(path) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame,
                           loop=0)
