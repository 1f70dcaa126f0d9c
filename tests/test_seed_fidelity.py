"""SEED against its official code (grypesc/SEED) piece by piece: AutoAugment's PIL operations, the 224-px
Resize + crop of Table 2, the normalisation statistics, the eps regulariser of the Gaussians, the Table 2 cards.

The references here are written from what the official code calls (PIL's Image.transform / rotate / ImageEnhance
/ ImageOps, torchvision's Resize, torch.inverse + torch.linalg.cholesky), not from cilbench's code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageEnhance, ImageOps
from test_data import write_cifar100

from cilbench.data.augment import Augmenter, crop_windows, resize
from cilbench.data.autoaugment import SIGNED, apply_pil_op, auto_augment, magnitude
from cilbench.errors import UserError
from cilbench.kit.gaussians import EPS_START, GaussianStore, fit_gaussian
from cilbench.run.runner import RunRequest, resolve

GREY = (128, 128, 128)
TABLE2_CARDS = ("cifar100_b50s10", "cifar100_b50s5", "cifar100_b40s3")


def pil_reference(img: Image.Image, op: str, m: float) -> Image.Image:
    """One operation as the official code's ops.py applies it to a PIL image (signed magnitude m)."""
    if op == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, m, 0, 0, 1, 0), Image.BICUBIC, fillcolor=GREY)
    if op == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, m, 1, 0), Image.BICUBIC, fillcolor=GREY)
    if op == "TranslateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, m, 0, 1, 0), fillcolor=GREY)
    if op == "TranslateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, m), fillcolor=GREY)
    if op == "Rotate":
        rotated = img.convert("RGBA").rotate(m)
        return Image.composite(rotated, Image.new("RGBA", rotated.size, (128,) * 4), rotated).convert(img.mode)
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    if op in enhance:
        return enhance[op](img).enhance(1 + m)
    if op == "Solarize":
        return ImageOps.solarize(img, m)
    if op == "Posterize":
        return ImageOps.posterize(img, int(m))
    return {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize, "Invert": ImageOps.invert}[op](img)


def seed_code_magnitude(op: str, level: int, side: int) -> float:
    """The official code's magnitude table (numpy.linspace over 10 bins; translations scaled by the side)."""
    table = {"ShearX": (0, 0.3), "ShearY": (0, 0.3), "TranslateX": (0, 150 / 331), "TranslateY": (0, 150 / 331),
             "Rotate": (0, 30), "Color": (0.0, 0.9), "Solarize": (256, 0), "Contrast": (0.0, 0.9),
             "Sharpness": (0.0, 0.9), "Brightness": (0.0, 0.9)}
    if op == "Posterize":
        return float(np.round(np.linspace(8, 4, 10), 0).astype(int)[level])
    if op not in table:
        return 0.0
    value = float(np.linspace(*table[op], 10)[level])
    return value * side if op.startswith("Translate") else value


def _images(n=8, side=32):
    """Noise, low contrast, a gradient, and smooth image-like content (upsampled noise)."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    imgs[1] = imgs[1] // 4 + 60
    imgs[2] = np.clip(imgs[2] // 2 + np.arange(side)[:, None, None] * 4, 0, 255).astype(np.uint8)
    for i in range(3, n):
        coarse = rng.integers(0, 256, (side // 4, side // 4, 3), dtype=np.uint8)
        imgs[i] = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR))
    return imgs


def _as_batch(imgs):
    return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).contiguous()


def _pil_batch(imgs, op, m):
    return _as_batch(np.stack([np.asarray(pil_reference(Image.fromarray(im), op, m)) for im in imgs]))


OPS = ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Color", "Posterize", "Solarize", "Contrast",
       "Sharpness", "Brightness", "AutoContrast", "Equalize", "Invert"]


@pytest.mark.parametrize("op", OPS)
def test_pil_operations_equal_pil_bit_for_bit(op):
    """Every operation, every bin and sign, equals PIL's output exactly on uint8 images."""
    imgs = _images()
    x = _as_batch(imgs)
    for level in range(10):
        for sign in ((1, -1) if op in SIGNED else (1,)):
            m = sign * magnitude(op, level, 32, 32, ops="pil")
            assert m == pytest.approx(sign * seed_code_magnitude(op, level, 32), abs=1e-12)
            assert torch.equal(apply_pil_op(x, op, m), _pil_batch(imgs, op, m)), (op, level, sign)


def test_pil_port_differs_from_torchvision_where_the_issue_says():
    """Fill grey vs black, solarize thresholds 256- vs 255-based (bin 0: torchvision inverts 255, the code
    nothing)."""
    x = _as_batch(_images(3))
    sheared = apply_pil_op(x, "ShearX", 0.3)
    assert (sheared[..., -1, -8:] == 128).all()                           # the corner the shear uncovers: grey
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.equal(apply_pil_op(white, "Solarize", magnitude("Solarize", 0, 4, 4, ops="pil")), white)
    assert magnitude("Solarize", 1, 32, 32, ops="pil") == pytest.approx(256 * 8 / 9)
    assert magnitude("Solarize", 1, 32, 32) == pytest.approx(255 * 8 / 9)


def test_pil_policy_batched_equals_per_sample_pil_with_the_same_decisions():
    """The whole CIFAR-10 policy: each sample's drawn sub-policy, coins and signs replayed through PIL."""
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy
    n = 32
    imgs = _images(n)
    x = _as_batch(imgs).float() / 255
    out = auto_augment(x, "cifar10", torch.Generator().manual_seed(3), ops="pil")
    policies = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
    gen = torch.Generator().manual_seed(3)
    choice = torch.randint(len(policies), (n,), generator=gen)
    draws = [(torch.rand(n, generator=gen), torch.rand(n, generator=gen) < 0.5) for _ in range(2)]
    applied = 0
    for i in range(n):
        img = Image.fromarray(imgs[i])
        for slot, (coin, negative) in enumerate(draws):
            op, prob, level = policies[int(choice[i])][slot]
            if coin[i] < prob:
                m = seed_code_magnitude(op, level or 0, 32)
                img = pil_reference(img, op, -m if (bool(negative[i]) and op in SIGNED) else m)
                applied += 1
        assert torch.equal(out[i], torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255), i
    assert applied > n // 2


def test_resize_and_crops_follow_torchvision():
    """Resize on a PIL image exactly (up as Table 2's 32 -> 256, and down); CenterCrop's window; random windows
    stay inside."""
    from torchvision.transforms import CenterCrop, Resize
    imgs = _images(3)
    for side in (256, 20):
        ours = resize(_as_batch(imgs).float() / 255, side)
        ref = _as_batch(np.stack([np.asarray(Resize(side)(Image.fromarray(im))) for im in imgs])).float() / 255
        assert ours.shape == (3, 3, side, side) and torch.equal(ours, ref), side
    ref = resize(_as_batch(imgs).float() / 255, 256)
    centre = crop_windows(ref, 224, None)
    ref_centre = _as_batch(np.stack([np.asarray(CenterCrop(224)(Resize(256)(Image.fromarray(im))))
                                     for im in imgs])).float() / 255
    assert torch.equal(centre, ref_centre)
    x = torch.arange(2 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10)
    windows = crop_windows(x, 4, torch.Generator().manual_seed(0))
    for w in windows:                                                   # a contiguous 4 x 4 block of x
        top, left = divmod(int(w[0, 0, 0]) % 100, 10)
        assert torch.equal(w, x[int(w[0, 0, 0]) // 100, :, top:top + 4, left:left + 4])


# --- the eps regulariser -----------------------------------------------------------------------------------

def official_eps(x: torch.Tensor, eps: float = 1e-8) -> float:
    """The official code's loop as its GaussianMixture behaves: eps x10 while torch.inverse of the float32
    covariance (MLE, divided by N) or the Cholesky factorisation of that inverse raises. Near the threshold the
    outcome hangs on the last bit of the covariance, so it is formed as cilbench forms it."""
    centred = x - x.mean(dim=0)
    c = (centred.T @ centred / len(x)).to(torch.float32)
    eye = torch.eye(len(c))
    while True:
        try:
            precision = torch.inverse(c + eps * eye)
            torch.linalg.cholesky(precision)
            return eps
        except RuntimeError:
            eps *= 10


def _features(n, s=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(s, s, generator=g, dtype=torch.float64) / 8
    return torch.randn(n, s, generator=g, dtype=torch.float64) @ mix + torch.randn(s, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n", [10, 32, 64, 100])
def test_eps_grows_as_the_official_code(n):
    """N rows (images + flips) at S = 64: the same eps as the official inverse-then-Cholesky test."""
    for seed in range(3):
        x = _features(n, seed=seed)
        assert fit_gaussian(x)[2] == official_eps(x), (n, seed)


def test_small_classes_get_a_far_larger_eps_than_the_old_cholesky_test():
    ratios = [fit_gaussian(x)[2] / fit_gaussian(x, test="cholesky")[2] for x in map(_features, (20, 40, 60))]
    assert min(ratios) >= 100                                          # measured: 1000x at N <= 40 (S = 64)
    big = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert fit_gaussian(big)[2] == fit_gaussian(big, test="cholesky")[2] == EPS_START     # well conditioned


def test_eps_carries_over_within_an_expert_and_task():
    from cilbench.methods.seed import SEED, SEEDConfig
    small = _features(20, seed=1)
    big = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    features = torch.cat([small, big])
    labels = torch.tensor([0] * 20 + [1] * 2000)

    def fitted(carry):
        method = SEED.__new__(SEED)
        method.cfg = SEEDConfig(eps_carry=carry)
        return method.fit_classes(GaussianStore(64), features, labels, [0, 1])
    grown = fit_gaussian(small)[2]
    assert grown > EPS_START
    assert fitted(True) == [grown, grown]                   # class 1 starts where class 0 ended (code)
    assert fitted(False) == [grown, EPS_START]


# --- resolved configuration: normalisation, AutoAugment ops, Table 2 cards ---------------------------------

def test_seed_normalises_cifar_cards_with_the_code_statistics():
    seed = resolve(RunRequest(method="seed", protocol="cifar100_b0s10")).protocol.augment
    assert seed.mean == [0.5071, 0.4866, 0.4409] and seed.std == [0.2009, 0.1984, 0.2023]
    assert seed.autoaugment_ops == "pil" and seed.autoaugment == "cifar10"
    card = resolve(RunRequest(method="seed", protocol="cifar100_b0s10",
                              overrides=["seed.normalisation=card", "seed.autoaugment_ops=torchvision"]))
    assert card.protocol.augment.std == [0.2675, 0.2565, 0.2761]
    assert card.config["protocol"]["augment"]["autoaugment_ops"] == "torchvision"
    der = resolve(RunRequest(method="der", protocol="cifar100_b0s10")).protocol.augment
    assert der.std == [0.2675, 0.2565, 0.2761] and der.autoaugment == "none"
    digits = resolve(RunRequest(method="seed", protocol="digits_b0s2")).protocol.augment
    assert digits.std == [0.376] and digits.autoaugment == "none" and digits.cutout == 0


@pytest.mark.parametrize("card", TABLE2_CARDS)
def test_table2_cards_run_the_papers_recipe_for_seed(card):
    resolved = resolve(RunRequest(method="seed", protocol=card))
    cfg, aug = resolved.method_cfg, resolved.protocol.augment
    assert (cfg.backbone, cfg.weight_decay, cfg.alpha, cfg.ft_epochs) == ("resnet18_imagenet", 1e-4, 1.0, 0)
    assert (cfg.experts, cfg.epochs, cfg.lr, cfg.milestones, cfg.tau) == (5, 200, 0.05, [60, 120, 160], 3.0)
    assert (aug.resize, aug.crop, aug.crop_padding, aug.flip, aug.autoaugment, aug.cutout) == \
        (256, 224, 0, True, "cifar10", 16)
    assert resolved.config["protocol"]["augment"]["resize"] == 256      # config.yaml records it
    other = resolve(RunRequest(method="der", protocol=card)).protocol.augment
    assert (other.resize, other.crop, other.crop_padding) == (0, 0, 4)  # other methods keep the card's
    small = resolve(RunRequest(method="seed", protocol=card, overrides=["method_augment.seed={}"])).protocol.augment
    assert (small.resize, small.crop, small.crop_padding) == (0, 0, 4)  # SEED at 32 px, as the docs say


def test_crop_larger_than_the_image_is_a_one_line_error():
    with pytest.raises(UserError, match="augment.crop=40 is larger than the 32-pixel"):
        resolve(RunRequest(method="seed", protocol="cifar100_b0s10", overrides=["augment.crop=40"]))


def test_augmenter_resizes_then_crops_train_and_test():
    from cilbench.data.protocol import AugmentConfig
    cfg = AugmentConfig(resize=24, crop=20, flip=True, mean=[0.5] * 3, std=[0.25] * 3)
    aug = Augmenter(cfg, 3, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    images = torch.from_numpy(_images(4, side=12)).permute(0, 3, 1, 2).contiguous()
    assert aug.train(images).shape == aug.test(images).shape == (4, 3, 20, 20)
    expected = (crop_windows(resize(images.float() / 255, 24), 20, None) - 0.5) / 0.25
    assert torch.allclose(aug.test(images), expected)


def test_cifar_shaped_run_with_the_official_pipeline(tmp_path, run_cli):
    """A tiny CIFAR-100 copy through SEED with the code's augmentation (AutoAugment PIL ops, black Cutout, the
    code's statistics, a resize + crop as Table 2) and K = 2 over 3 tasks: completes and records the pipeline."""
    data_root = tmp_path / "data"
    write_cifar100(data_root, classes=[68, 56, 78, 8, 23, 84], train_per_class=6, test_per_class=2)
    card = {"name": "cifar100_tiny", "description": "tiny CIFAR-100 copy", "dataset": "cifar100",
            "num_classes": 6, "base": 0, "step": 2, "tasks": 3, "class_order": "seed1993",
            "memory": {"policy": "fixed_total", "total": 8}, "backbone": {"name": "resnet20", "width": 4},
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.01},
            "augment": {"crop_padding": 4, "flip": True, "brightness": 0.247059, "mean": [0.5071, 0.4867, 0.4408],
                        "std": [0.2675, 0.2565, 0.2761]},
            "method_augment": {"seed": {"resize": 40, "crop": 36, "crop_padding": 0}},
            "methods": {"seed": {"experts": 2, "epochs": 1, "milestones": [], "ft_epochs": 1, "ft_milestones": [],
                                 "latent_dim": 8}},
            "eval_batch_size": 64}
    path = tmp_path / "cifar100_tiny.yaml"
    path.write_text(yaml.safe_dump(card))
    res = run_cli("seed", str(path), tmp_path / "runs", "--data-root", str(data_root), "--epochs", "1",
                  "--set", "data.verify_checksums=false")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "cifar100_tiny" / "seed" / "seed0"
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    recorded = yaml.safe_load((run / "config.yaml").read_text())["protocol"]["augment"]
    assert (recorded["autoaugment"], recorded["autoaugment_ops"], recorded["cutout"]) == ("cifar10", "pil", 16)
    assert recorded["std"] == [0.2009, 0.1984, 0.2023] and (recorded["resize"], recorded["crop"]) == (40, 36)
