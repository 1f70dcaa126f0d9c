"""Batched augmentation on the device, drawn from a seeded generator.

Each op takes a float batch in [0, 1] (N, C, H, W) and returns one of the same kind; no per-sample Python.
Semantics follow torchvision's transforms of the same name (RandomCrop with zero padding, ColorJitter
factors drawn uniformly in [1-b, 1+b], RandomResizedCrop's box drawn as its get_params: up to 10 tries,
then the central fallback); ColorJitter's ops are applied in a fixed order rather than a random one, and
RandomResizedCrop resamples without antialiasing, which are the documented differences.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from cilbench.data.protocol import AugmentConfig


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) * (hi - lo) + lo


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding): zero-pad, then take a window at a random offset per image (one gather)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    width = w + 2 * padding
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=gen)
    window = (torch.arange(h, device=x.device)[:, None] * width + torch.arange(w, device=x.device)).flatten()
    index = (window[None, :] + (dy * width + dx)[:, None])[:, None, :].expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


PIL_PRECISION_BITS = 22         # Pillow's fixed-point coefficients for 8-bit resampling (Resample.c)


@functools.lru_cache(maxsize=16)
def _pil_bilinear_weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) fixed-point weights of PIL's bilinear resize along one axis: a triangle filter at
    pixel centres, widened by the scale when shrinking (antialiasing), normalised per output pixel, then
    rounded to integers of 2^22."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale                          # bilinear support 1, scaled
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out in range(out_size):
        centre = (out + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        taps = torch.tensor([max(0.0, 1.0 - abs((i - centre + 0.5) / filter_scale)) for i in range(lo, hi)],
                            dtype=torch.float64)
        if float(taps.sum()) != 0.0:
            taps = taps / taps.sum()
        weights[out, lo:hi] = taps
    unit = float(1 << PIL_PRECISION_BITS)
    return torch.where(weights < 0, torch.ceil(weights * unit - 0.5), torch.floor(weights * unit + 0.5))


def _pil_pass(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One resampling pass along the last axis of integer-valued float64 x, rounded and clipped to uint8 values
    as PIL's 8-bit pass (exact: every sum stays far below 2^53)."""
    total = x @ weights.T + float(1 << (PIL_PRECISION_BITS - 1))
    return torch.div(total, float(1 << PIL_PRECISION_BITS), rounding_mode="floor").clamp_(0, 255)


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Resize a float batch in [0, 1] of uint8 values to side x side as torchvision's Resize does on a PIL image
    (PIL's bilinear resize: a horizontal then a vertical 8-bit pass, fixed-point weights), equal to it
    (tests/test_seed_fidelity.py). Returns the uint8 values / 255."""
    n, c, h, w = x.shape
    if (h, w) == (side, side):
        return x
    values = (x.double() * 255).round()
    along_width, along_height = (_pil_bilinear_weights(size, side).to(x.device) for size in (w, h))
    values = _pil_pass(values, along_width)
    values = _pil_pass(values.transpose(-1, -2), along_height).transpose(-1, -2)
    return (values / 255).to(x.dtype)


def crop_windows(x: torch.Tensor, side: int, gen: torch.Generator | None) -> torch.Tensor:
    """RandomCrop(side) without padding (a window at a uniform offset per image, one gather); gen None: the
    central window (CenterCrop)."""
    n, c, h, w = x.shape
    if gen is None:
        top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
        return x[..., top:top + side, left:left + side]
    dy = torch.randint(0, h - side + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, w - side + 1, (n,), device=x.device, generator=gen)
    window = (torch.arange(side, device=x.device)[:, None] * w + torch.arange(side, device=x.device)).flatten()
    index = (window[None, :] + (dy * w + dx)[:, None])[:, None, :].expand(n, c, side * side)
    return x.flatten(2).gather(2, index).view(n, c, side, side)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def rrc_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
              gen: torch.Generator, device=None, tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop.get_params, batched: per image up to `tries` draws of an area fraction in `scale`
    and a log-uniform aspect ratio in `ratio`, rounded to whole pixels; the first draw that fits the image wins,
    at a uniform integer offset; an image with none that fits gets torchvision's fallback, the central crop of
    the largest box whose ratio is clamped into `ratio`. Returns (n, 4) int64 rows (top, left, h, w)."""
    area = _uniform(n * tries, scale[0], scale[1], gen, device).view(n, tries) * (height * width)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device)).view(n, tries)
    w = torch.round(torch.sqrt(area * aspect)).long()     # round half to even, as Python's round()
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.long().argmax(1), torch.zeros(n, dtype=torch.long, device=device))
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    u_top = torch.rand(n, device=device, generator=gen)
    u_left = torch.rand(n, device=device, generator=gen)
    top = (u_top * (height - h + 1)).long().clamp(max=height - h)
    left = (u_left * (width - w + 1)).long().clamp(max=width - w)
    # fallback: torchvision's central crop
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    ok = fits.any(1)
    h = torch.where(ok, h, torch.full_like(h, fh))
    w = torch.where(ok, w, torch.full_like(w, fw))
    top = torch.where(ok, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(ok, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack((top, left, h, w), 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's pixel box (top, left, h, w) resampled to size x size, bilinear (no antialiasing): one
    affine grid over the batch. A box of the output's own size is copied exactly."""
    n, c, height, width = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = w / width, h / height
    theta[:, 0, 2] = (2 * left + w) / width - 1        # box centre in [-1, 1] (pixel edges, align_corners=False)
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], gen: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio): a box drawn as torchvision's get_params (up to 10 tries per
    image, then the central fallback), bilinear resample to size x size."""
    boxes = rrc_boxes(x.shape[0], x.shape[-2], x.shape[-1], scale, ratio, gen, x.device)
    return resized_crop(x, boxes, size)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _factors(n: int, strength: float, gen: torch.Generator, device) -> torch.Tensor:
    return _uniform(n, max(0.0, 1 - strength), 1 + strength, gen, device)[:, None, None, None]


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 gen: torch.Generator) -> torch.Tensor:
    """Each op blends the image with a reference (black, its mean grey, its grey image) by a random factor,
    then clamps to [0, 1], as torchvision's adjust_brightness / contrast / saturation."""
    n = x.shape[0]
    if brightness > 0:
        x = (x * _factors(n, brightness, gen, x.device)).clamp_(0, 1)
    if contrast > 0:
        f = _factors(n, contrast, gen, x.device)
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (x * f + (1 - f) * mean).clamp_(0, 1)
    if saturation > 0 and x.shape[1] == 3:
        f = _factors(n, saturation, gen, x.device)
        x = (x * f + (1 - f) * _gray(x)).clamp_(0, 1)
    return x


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """torchvision's tensor rgb -> hsv, batched (all channels in [0, 1])."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    same = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    s = chroma / torch.where(same, ones, maxc)
    div = torch.where(same, ones, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    sector = (i[:, None] == torch.arange(6, device=x.device).view(1, -1, 1, 1)).to(x.dtype)   # [N, 6, H, W]
    table = torch.stack((torch.stack((v, q, p, p, t, v), 1), torch.stack((t, v, v, q, p, p), 1),
                         torch.stack((p, p, t, v, v, q), 1)), 1)                             # [N, 3, 6, H, W]
    return (table * sector[:, None]).sum(2)


def adjust_hue(x: torch.Tensor, hue: float, gen: torch.Generator) -> torch.Tensor:
    """ColorJitter(hue=h): rotate the hue of each image by a factor drawn in [-h, h] (RGB only)."""
    if x.shape[1] != 3:
        return x
    shift = _uniform(x.shape[0], -hue, hue, gen, x.device)[:, None, None]
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack((torch.remainder(hsv[:, 0] + shift, 1.0), hsv[:, 1], hsv[:, 2]), dim=1)
    return _hsv_to_rgb(hsv)


def random_apply(x: torch.Tensor, op, p: float, gen: torch.Generator) -> torch.Tensor:
    """RandomApply([op], p): each image gets op(x) with probability p, else stays as it is."""
    pick = torch.rand(x.shape[0], device=x.device, generator=gen) < p
    return torch.where(pick[:, None, None, None], op(x), x)


def random_grayscale(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    pick = torch.rand(x.shape[0], device=x.device, generator=gen) < p
    return torch.where(pick[:, None, None, None], _gray(x).expand_as(x), x)


def cutout(x: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a side x side square (clipped at the border) centred at a random pixel of each image."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device, generator=gen)
    cx = torch.randint(0, w, (n,), device=x.device, generator=gen)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy[:, None, None]).abs() <= side // 2) & ((xs - cx[:, None, None]).abs() <= side // 2)
    if side % 2 == 0:   # even side: the square spans [c - side/2, c + side/2)
        inside &= (ys - cy[:, None, None] < side // 2) & (xs - cx[:, None, None] < side // 2)
    return x * (~inside)[:, None].to(x.dtype)


class Augmenter:
    """Turns uint8 batches into normalised float batches: `train` with the card's ops, `test` without."""

    def __init__(self, cfg: AugmentConfig, channels: int, device: torch.device,
                 channels_last: bool = False, generator: torch.Generator | None = None):
        self.cfg = cfg
        mean = cfg.mean if len(cfg.mean) == channels else [sum(cfg.mean) / len(cfg.mean)] * channels
        std = cfg.std if len(cfg.std) == channels else [sum(cfg.std) / len(cfg.std)] * channels
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.device = device
        self.channels_last = channels_last
        self.gen = generator if generator is not None else torch.Generator(device=device)

    def seed(self, seed: int) -> None:
        self.gen.manual_seed(seed)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).float().div_(255.0)

    def test(self, images: torch.Tensor) -> torch.Tensor:
        """Test transform: normalise; images larger than the training crop (ImageNet train images kept at
        256 for herding and prototypes) are centre-cropped to it, as Resize(256) + CenterCrop(224)."""
        x = self.to_float(images)
        if self.cfg.resize:
            x = resize(x, self.cfg.resize)
        if self.cfg.crop:
            return self._finish(crop_windows(x, self.cfg.crop, None))
        size = self.cfg.random_resized_crop
        if size and (x.shape[-2] > size or x.shape[-1] > size):
            top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
            x = x[..., top:top + size, left:left + size]
        return self._finish(x)

    def train(self, images: torch.Tensor) -> torch.Tensor:
        cfg, g = self.cfg, self.gen
        x = self.to_float(images)
        if cfg.resize:
            x = resize(x, cfg.resize)
        if cfg.crop:
            x = crop_windows(x, cfg.crop, g)
        if cfg.random_resized_crop:
            x = random_resized_crop(x, cfg.random_resized_crop, tuple(cfg.rrc_scale), g)
        if cfg.crop_padding:
            x = random_crop(x, cfg.crop_padding, g)
        if cfg.flip:
            x = random_flip(x, g)
        if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
            def jitter(v):
                v = color_jitter(v, cfg.brightness, cfg.contrast, cfg.saturation, g)
                return adjust_hue(v, cfg.hue, g) if cfg.hue else v
            x = jitter(x) if cfg.jitter_p >= 1 else random_apply(x, jitter, cfg.jitter_p, g)
        if cfg.grayscale_p:
            x = random_grayscale(x, cfg.grayscale_p, g)
        if cfg.autoaugment != "none":
            from cilbench.data.autoaugment import auto_augment
            x = auto_augment(x, cfg.autoaugment, g, cfg.autoaugment_ops)
        if cfg.cutout and not cfg.cutout_normalised:
            x = cutout(x, cfg.cutout, g)      # black hole, then normalised with the rest
        x = (x - self.mean) / self.std
        if cfg.cutout and cfg.cutout_normalised:
            x = cutout(x, cfg.cutout, g)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
