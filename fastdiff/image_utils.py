"""PNG output without matplotlib: image grids and line plots drawn with Pillow."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


class NonFiniteImagesError(ValueError):
    """Images (samples) that hold NaN or inf: nothing is written."""


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2, scale: int = 1) -> Image.Image:
    """A grid of a batch (N, C, H, W), float in [-1, 1] or uint8, as a PIL image. Non-finite
    values are refused: clamped to -1 they would draw as black pixels, a silent wrong image."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dtype != torch.uint8:
        finite = torch.isfinite(images.detach())
        if not bool(finite.all()):
            bad = int((~finite).flatten(1).any(dim=1).sum())
            raise NonFiniteImagesError(f"{bad} of {images.shape[0]} images hold NaN or inf values; "
                                       f"refusing to draw them")
        images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = images.cpu()
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    grid = np.zeros((3, ncol * (h + padding) + padding, nrow * (w + padding) + padding), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i, :3].numpy()
    img = Image.fromarray(grid.transpose(1, 2, 0))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_image_grid(images: torch.Tensor, path, nrow: Optional[int] = None, scale: int = 1) -> None:
    """Draw the grid first (it refuses non-finite images), then create the folder and write."""
    img = image_grid(images, nrow=nrow, scale=scale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def _nice_ticks(lo: float, hi: float, count: int = 5):
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-12 * abs(hi):
        ticks.append(v)
        v += step
    return ticks


def _fmt(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e7:
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def plot_curve(xs: Sequence[float], ys: Sequence[float], path, title: str = "training loss",
               xlabel: str = "step", ylabel: str = "loss", smooth: int = 0, log_y: bool = False,
               size=(720, 440)) -> None:
    """A line plot with axes, ticks, labels and title; optionally a moving average drawn over
    the raw curve (smooth = window) and a log10 y axis."""
    W, H = size
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 36, 56
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    keep = np.isfinite(ys) & (ys > 0 if log_y else True)
    xs, ys = xs[keep], ys[keep]
    draw.text((W // 2, 12), title, fill="black", font=font, anchor="mt")
    draw.text((left + (W - left - right) // 2, H - 14), xlabel, fill="black", font=font, anchor="mb")
    ylab = f"{ylabel} (log scale)" if log_y else ylabel
    # a vertical y label: render horizontally, rotate
    tmp = Image.new("RGB", (int(draw.textlength(ylab, font=font)) + 4, 14), "white")
    ImageDraw.Draw(tmp).text((2, 1), ylab, fill="black", font=font)
    tmp = tmp.rotate(90, expand=True)
    img.paste(tmp, (6, top + (H - top - bottom - tmp.height) // 2))
    x0, y0, x1, y1 = left, top, W - right, H - bottom
    draw.rectangle([x0, y0, x1, y1], outline="black")
    if xs.size == 0:
        draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "no data", fill="gray", font=font, anchor="mm")
        img.save(path)
        return
    yv = np.log10(ys) if log_y else ys
    xlo, xhi = float(xs.min()), float(xs.max())
    ylo, yhi = float(np.percentile(yv, 0.5)), float(yv.max())
    if xhi <= xlo:
        xhi = xlo + 1
    if yhi <= ylo:
        yhi = ylo + 1e-3
    pad = 0.05 * (yhi - ylo)
    ylo, yhi = ylo - pad, yhi + pad

    def px(x):
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y):
        return y1 - (min(max(y, ylo), yhi) - ylo) / (yhi - ylo) * (y1 - y0)

    for t in _nice_ticks(xlo, xhi):
        X = px(t)
        draw.line([X, y1, X, y1 + 4], fill="black")
        draw.line([X, y0, X, y1], fill=(230, 230, 230))
        draw.text((X, y1 + 6), _fmt(t), fill="black", font=font, anchor="mt")
    if log_y:  # decades, with 2x and 5x when the range spans few of them
        mults = (1, 2, 5) if yhi - ylo < 2.5 else (1,)
        yticks = [math.log10(m) + k for k in range(math.floor(ylo), math.ceil(yhi) + 1) for m in mults]
        yticks = [t for t in yticks if ylo <= t <= yhi]
    else:
        yticks = _nice_ticks(ylo, yhi)
    for t in yticks:
        Y = py(t)
        draw.line([x0 - 4, Y, x0, Y], fill="black")
        draw.line([x0, Y, x1, Y], fill=(230, 230, 230))
        draw.text((x0 - 6, Y), _fmt(10 ** t if log_y else t), fill="black", font=font, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    pts = [(px(a), py(b)) for a, b in zip(xs, yv)]
    colour = (160, 190, 230) if smooth and len(pts) > smooth else (30, 80, 200)
    if len(pts) > 1:
        draw.line(pts, fill=colour, width=1)
    else:
        draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
    if smooth and len(pts) > smooth:
        kernel = np.ones(smooth) / smooth
        ys_s = np.convolve(yv, kernel, mode="valid")
        xs_s = xs[smooth - 1:]
        draw.line([(px(a), py(b)) for a, b in zip(xs_s, ys_s)], fill=(20, 60, 180), width=2)
        draw.text((x1 - 6, y0 + 6), f"moving average ({smooth})", fill=(20, 60, 180), font=font, anchor="rt")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
