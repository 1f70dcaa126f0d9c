"""AutoAugment (Cubuk et al., CVPR 2019) on a batch on the device, each sample with its own sub-policy.

The policies are torchvision's (`AutoAugment(policy).policies`, the paper's CIFAR-10 / ImageNet / SVHN lists;
the CIFAR10Policy / ImageNetPolicy of SEED's, FeTrIL's and PyCIL's code list the same sub-policies). Two
implementations of the operations:

- `torchvision`: as `torchvision.transforms.AutoAugment` on tensors: nearest interpolation, fill 0, whole-pixel
  translations, solarize threshold 255 (1 - level / 9).
- `pil`: the PIL port those codes use (`ops.py` of grypesc/SEED, G-U-N/PyCIL): shears resampled bicubically
  (PIL's a = -1 cubic), translations by a fractional offset and rotations, both nearest, all filled with grey
  128; solarize threshold 256 (1 - level / 9); colour operations as ImageEnhance (blend in float32, truncated).
  Equal to PIL's own output bit for bit on uint8 images (tests/test_seed_fidelity.py).

Every sample draws a sub-policy, a coin per operation and a sign for signed operations from the augmenter's
seeded generator; samples that share (sub-policy, operation applied, sign) are transformed together, so a batch
costs at most 2 x 2 x |policies| batched calls, never a loop over samples.
"""
from __future__ import annotations

import math

import torch
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode
from torchvision.transforms import functional as TF

POLICIES = {"cifar10": AutoAugmentPolicy.CIFAR10, "imagenet": AutoAugmentPolicy.IMAGENET,
            "svhn": AutoAugmentPolicy.SVHN}
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
BINS = 10
OPS = ("torchvision", "pil")
PIL_FILL = 128


def _bin(start: float, stop: float, level: int) -> float:
    """Bin `level` of numpy.linspace(start, stop, 10), as the PIL port's magnitude table computes it."""
    return stop if level == BINS - 1 else start + level * ((stop - start) / (BINS - 1))


def magnitude(op: str, level: int | None, height: int, width: int, ops: str = "torchvision") -> float:
    """The magnitude of bin `level` (0..9) for an operation (AutoAugment's 10-bin table). `ops="pil"`: the PIL
    port's table (fractional translations, solarize from 256)."""
    if level is None:
        return 0.0
    if ops == "pil":
        if op == "TranslateX":
            return _bin(0.0, 150 / 331, level) * width
        if op == "TranslateY":
            return _bin(0.0, 150 / 331, level) * height
        if op == "Solarize":
            return _bin(256.0, 0.0, level)
        span = {"ShearX": 0.3, "ShearY": 0.3, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9,
                "Sharpness": 0.9}
        if op in span:
            return _bin(0.0, span[op], level)
    f = level / (BINS - 1)
    if op in ("ShearX", "ShearY"):
        return 0.3 * f
    if op == "TranslateX":
        return 150.0 / 331.0 * width * f
    if op == "TranslateY":
        return 150.0 / 331.0 * height * f
    if op == "Rotate":
        return 30.0 * f
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * f
    if op == "Posterize":
        return float(8 - round(level / ((BINS - 1) / 4)))
    if op == "Solarize":
        return 255.0 * (1 - f)
    return 0.0


def apply_op(x: torch.Tensor, op: str, m: float) -> torch.Tensor:
    """One operation at magnitude m on a uint8 batch (N, C, H, W)."""
    near = InterpolationMode.NEAREST
    if op == "ShearX":
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(m)), 0.0],
                         interpolation=near, center=[0, 0])
    if op == "ShearY":
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(m))],
                         interpolation=near, center=[0, 0])
    if op == "TranslateX":
        return TF.affine(x, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0], interpolation=near)
    if op == "TranslateY":
        return TF.affine(x, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0], interpolation=near)
    if op == "Rotate":
        return TF.rotate(x, m, interpolation=near)
    if op == "Brightness":
        return TF.adjust_brightness(x, 1.0 + m)
    if op == "Color":
        return TF.adjust_saturation(x, 1.0 + m) if x.shape[1] == 3 else x
    if op == "Contrast":
        return TF.adjust_contrast(x, 1.0 + m)
    if op == "Sharpness":
        return TF.adjust_sharpness(x, 1.0 + m)
    if op == "Posterize":
        return TF.posterize(x, int(m))
    if op == "Solarize":
        return TF.solarize(x, m)
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    if op == "Invert":
        return TF.invert(x)
    raise ValueError(f"unknown AutoAugment operation {op}")


# --- the PIL port's operations, on uint8 batches (N, C, H, W); PIL samples at pixel centres (x + 0.5, y + 0.5)


def _centres(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(h, dtype=torch.float64, device=device)[:, None].expand(h, w) + 0.5
    xs = torch.arange(w, dtype=torch.float64, device=device)[None, :].expand(h, w) + 0.5
    return xs, ys


def _gather(x: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """x[..., iy, ix] for (H, W) index maps, indices clamped into the image (PIL's XCLIP / YCLIP)."""
    n, c, h, w = x.shape
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).flatten()
    return x.flatten(2)[:, :, flat].view(n, c, h, w)


def _nearest(x: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor, fill: int) -> torch.Tensor:
    inside = (ix >= 0) & (ix < x.shape[-1]) & (iy >= 0) & (iy < x.shape[-2])
    return torch.where(inside, _gather(x, iy, ix), torch.full_like(x, fill))


def _cubic(v0, v1, v2, v3, d):
    """PIL's cubic convolution (a = -1) between v1 and v2 at fraction d."""
    return v1 + d * ((v2 - v0) + d * ((2 * (v0 - v1) + v2 - v3) + d * (v1 - v0 - v2 + v3)))


def _bicubic(x: torch.Tensor, xin: torch.Tensor, yin: torch.Tensor, fill: int) -> torch.Tensor:
    """PIL's bicubic transform filter: source points outside the image take `fill`; 4 x 4 clamped taps; the
    result clipped to [0, 255] and truncated."""
    h, w = x.shape[-2:]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    fx, fy = torch.floor(xin - 0.5), torch.floor(yin - 0.5)
    dx, dy = xin - 0.5 - fx, yin - 0.5 - fy
    fx, fy = fx.long() - 1, fy.long() - 1
    xf = x.double()
    rows = [_cubic(*[_gather(xf, fy + j, fx + i) for i in range(4)], dx) for j in range(4)]
    v = _cubic(*rows, dy).clamp(0, 255).trunc()
    return torch.where(inside, v, torch.full_like(v, fill)).to(torch.uint8)


def _fixed(v: float) -> int:
    return math.floor(v * 65536.0 + 0.5)


def _pil_rotate(x: torch.Tensor, degrees: float, fill: int) -> torch.Tensor:
    """Image.rotate(degrees) (nearest, about the centre, PIL's 16.16 fixed-point affine), outside = fill."""
    degrees = degrees % 360.0
    if degrees == 0:
        return x
    h, w = x.shape[-2:]
    r = -math.radians(degrees)
    a, b, d, e = round(math.cos(r), 15), round(math.sin(r), 15), round(-math.sin(r), 15), round(math.cos(r), 15)
    c = a * -w / 2 + b * -h / 2 + w / 2
    f = d * -w / 2 + e * -h / 2 + h / 2
    ys = torch.arange(h, device=x.device)[:, None]
    xs = torch.arange(w, device=x.device)[None, :]
    ix = torch.div(_fixed(c + a / 2 + b / 2) + ys * _fixed(b) + xs * _fixed(a), 65536, rounding_mode="floor")
    iy = torch.div(_fixed(f + d / 2 + e / 2) + ys * _fixed(e) + xs * _fixed(d), 65536, rounding_mode="floor")
    return _nearest(x, ix.expand(h, w), iy.expand(h, w), fill)


def _pil_gray(x: torch.Tensor) -> torch.Tensor:
    """convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (N, 1, H, W) int64."""
    if x.shape[1] == 1:
        return x.long()
    x = x.long()
    return ((x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 0x8000) >> 16)[:, None]


def _pil_blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """Image.blend(degenerate, x, factor) = ImageEnhance's enhance(factor): float32, clipped, truncated."""
    d = degenerate.float()
    v = d + torch.tensor(factor, dtype=torch.float32) * (x.float() - d)
    return v.clamp(0, 255).trunc().to(torch.uint8)


def _pil_smooth(x: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH (3 x 3 kernel 1 1 1 / 1 5 1 / 1 1 1, / 13, rounded); the border rows and columns kept."""
    n, c, h, w = x.shape
    kernel = (torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13).view(1, 1, 3, 3)
    inner = torch.nn.functional.conv2d(x.float().view(n * c, 1, h, w), kernel).view(n, c, h - 2, w - 2)
    out = x.clone()
    out[..., 1:-1, 1:-1] = (inner + 0.5).clamp(0, 255).trunc().to(torch.uint8)
    return out


def apply_pil_op(x: torch.Tensor, op: str, m: float, fill: int = PIL_FILL) -> torch.Tensor:
    """One operation of the PIL port at signed magnitude m on a uint8 batch (N, C, H, W)."""
    h, w = x.shape[-2:]
    xs, ys = _centres(h, w, x.device)
    if op == "ShearX":           # PIL affine (1, m, 0, 0, 1, 0): output (x, y) samples input (x + m y, y)
        return _bicubic(x, xs + m * ys, ys, fill)
    if op == "ShearY":
        return _bicubic(x, xs, m * xs + ys, fill)
    if op == "TranslateX":
        return _nearest(x, torch.floor(xs + m).long(), torch.floor(ys).long(), fill)
    if op == "TranslateY":
        return _nearest(x, torch.floor(xs).long(), torch.floor(ys + m).long(), fill)
    if op == "Rotate":
        return _pil_rotate(x, m, fill)
    if op == "Color":
        return _pil_blend(_pil_gray(x).expand_as(x), x, 1 + m)
    if op == "Contrast":
        mean = torch.floor(_pil_gray(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5)
        return _pil_blend(mean.expand_as(x), x, 1 + m)
    if op == "Brightness":
        return _pil_blend(torch.zeros_like(x), x, 1 + m)
    if op == "Sharpness":
        return _pil_blend(_pil_smooth(x), x, 1 + m)
    if op == "Solarize":         # ImageOps.solarize: values at or above the threshold are inverted
        return torch.where(x.double() < m, x, 255 - x)
    if op == "AutoContrast":     # ImageOps.autocontrast: per channel, int(v * scale - lo * scale)
        lo = x.amin(dim=(2, 3), keepdim=True).double()
        hi = x.amax(dim=(2, 3), keepdim=True).double()
        scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1)    # true division: 255 / t is 255 * (1 / t)
        stretched = (x.double() * scale + (-lo * scale)).trunc().clamp(0, 255)
        return torch.where(hi > lo, stretched, x.double()).to(torch.uint8)
    if op in ("Posterize", "Equalize", "Invert"):   # torchvision's equal PIL's ImageOps here
        return apply_op(x, op, m)
    raise ValueError(f"unknown AutoAugment operation {op}")


def auto_augment(x: torch.Tensor, policy: str, gen: torch.Generator, ops: str = "torchvision") -> torch.Tensor:
    """AutoAugment on a float batch in [0, 1] (N, C, H, W); returns a float batch in [0, 1]. `ops`: which
    implementation of the operations (module docstring)."""
    if ops not in OPS:
        raise ValueError(f"AutoAugment ops must be one of {OPS}, got {ops!r}")
    apply = apply_pil_op if ops == "pil" else apply_op
    policies = AutoAugment(POLICIES[policy]).policies
    n, device = len(x), x.device
    img = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    choice = torch.randint(len(policies), (n,), generator=gen, device=device)
    for slot in range(2):
        coin = torch.rand(n, generator=gen, device=device)
        sign = torch.rand(n, generator=gen, device=device) < 0.5
        probs = torch.tensor([p[slot][1] for p in policies], device=device)
        applied = coin < probs[choice]
        for key in torch.unique(choice[applied] * 2 + sign[applied].long()).tolist():
            pid, negative = divmod(key, 2)
            op, _, level = policies[pid][slot]
            rows = torch.nonzero(applied & (choice == pid) & (sign == bool(negative))).flatten()
            m = magnitude(op, level, img.shape[-2], img.shape[-1], ops)
            img[rows] = apply(img[rows], op, -m if (negative and op in SIGNED) else m)
    return img.float().div_(255.0)
