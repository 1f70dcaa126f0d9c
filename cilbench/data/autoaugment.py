"""AutoAugment (Cubuk et al., CVPR 2019) on a batch on the device, each sample with its own sub-policy.

The policies are torchvision's (`AutoAugment(policy).policies`, the paper's CIFAR-10 / ImageNet / SVHN lists,
as in the CIFAR10Policy that SEED's and FeTrIL's code use); magnitudes follow the same 10-bin table. Every
sample draws a sub-policy, a coin per operation and a sign for signed operations from the augmenter's seeded
generator; samples that share (sub-policy, operation applied, sign) are transformed together, so a batch costs
at most 2 x 2 x |policies| batched calls, never a loop over samples.
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


def magnitude(op: str, level: int | None, height: int, width: int) -> float:
    """The magnitude of bin `level` (0..9) for an operation (AutoAugment's 10-bin table)."""
    if level is None:
        return 0.0
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


def auto_augment(x: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
    """AutoAugment on a float batch in [0, 1] (N, C, H, W); returns a float batch in [0, 1]."""
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
            m = magnitude(op, level, img.shape[-2], img.shape[-1])
            img[rows] = apply_op(img[rows], op, -m if (negative and op in SIGNED) else m)
    return img.float().div_(255.0)
