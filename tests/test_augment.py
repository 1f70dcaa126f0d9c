"""Batched on-device augmentation: shapes, dtype, seeding, and what each op does to the pixels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cilbench.data.augment import (
    Augmenter,
    color_jitter,
    cutout,
    random_crop,
    random_flip,
    random_grayscale,
    random_resized_crop,
    resized_crop,
    rrc_boxes,
)
from cilbench.data.protocol import AugmentConfig

CPU = torch.device("cpu")


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _images(n=16, c=3, side=16, seed=0):
    g = _gen(seed)
    return torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8)


def _all_ops():
    return AugmentConfig(random_resized_crop=12, crop_padding=2, flip=True, brightness=0.4, contrast=0.4,
                         saturation=0.4, grayscale_p=0.2, cutout=4)


def test_test_transform_is_exact_normalisation():
    cfg = AugmentConfig(mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 0.125])
    aug = Augmenter(cfg, 3, CPU)
    x = _images()
    out = aug.test(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-6)


def test_single_channel_data_with_a_three_value_mean():
    aug = Augmenter(AugmentConfig(mean=[0.2, 0.4, 0.6], std=[0.5, 0.5, 0.5]), 1, CPU)
    x = _images(c=1)
    assert torch.allclose(aug.test(x), (x.float() / 255 - 0.4) / 0.5, atol=1e-6)


def test_train_shapes_and_dtype():
    x = _images()
    aug = Augmenter(_all_ops(), 3, CPU)
    aug.seed(0)
    out = aug.train(x)
    assert out.dtype == torch.float32
    assert out.shape == (16, 3, 12, 12)          # random-resized crop sets the output side
    no_rrc = Augmenter(AugmentConfig(crop_padding=4, flip=True, brightness=0.25, cutout=8), 3, CPU)
    no_rrc.seed(0)
    assert no_rrc.train(x).shape == x.shape
    assert torch.isfinite(out).all()


def test_same_seed_same_batch_different_seed_different_batch():
    x = _images()
    outs = []
    for seed in (0, 0, 1):
        aug = Augmenter(_all_ops(), 3, CPU)
        aug.seed(seed)
        outs.append(aug.train(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_consecutive_batches_differ_and_reseeding_replays():
    x = _images()
    aug = Augmenter(_all_ops(), 3, CPU)
    aug.seed(5)
    first, second = aug.train(x), aug.train(x)
    assert not torch.equal(first, second)
    aug.seed(5)
    assert torch.equal(aug.train(x), first)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    pad = 2
    x = torch.rand(32, 3, 8, 8, generator=_gen(1)) + 0.5      # no zeros in the content
    out = random_crop(x, pad, _gen(2))
    assert out.shape == x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(found) == 1, f"image {i} is not a window of its padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 3                   # offsets are drawn per image
    assert any(o != (pad, pad) for o in offsets)


def test_flip_mirrors_some_images_and_keeps_the_rest():
    x = torch.rand(64, 3, 5, 7, generator=_gen(3))
    out = random_flip(x, _gen(4))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)
    # flipping is horizontal: the column order reverses
    i = flipped.index(True)
    assert torch.equal(out[i][..., 0], x[i][..., -1])


@pytest.mark.parametrize("side", [5, 4])
def test_cutout_zeroes_one_square(side):
    n, h, w = 64, 16, 16
    x = torch.ones(n, 3, h, w)
    out = cutout(x, side, _gen(5))
    full = 0
    for i in range(n):
        zero = out[i] == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])   # same square on all channels
        mask = zero[0]
        rows = torch.nonzero(mask.any(1)).flatten()
        cols = torch.nonzero(mask.any(0)).flatten()
        assert len(rows) and len(cols), "cutout must zero something"
        # a rectangle (a square clipped at the border), contiguous, at most side x side
        assert len(rows) <= side and len(cols) <= side
        assert rows.tolist() == list(range(int(rows[0]), int(rows[-1]) + 1))
        assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))
        assert int(mask.sum()) == len(rows) * len(cols)
        assert torch.equal(out[i][:, ~mask], x[i][:, ~mask])                      # the rest is untouched
        if len(rows) == side and len(cols) == side:
            full += 1
    assert full > 0


def test_cutout_before_normalisation_cuts_a_black_hole():
    """cutout_normalised false: Cutout on the [0, 1] image, then Normalize (the hole is black, not the mean)."""
    cfg = AugmentConfig(cutout=4, cutout_normalised=False, mean=[0.5] * 3, std=[0.25] * 3)
    aug = Augmenter(cfg, 3, CPU)
    aug.seed(0)
    out = aug.train(torch.full((8, 3, 16, 16), 255, dtype=torch.uint8))     # 1.0 -> 2.0 after normalising
    black = (out == -2.0).all(1).flatten(1).sum(1)
    assert (black > 0).all() and (black <= 16).all()
    assert ((out == -2.0) | (out == 2.0)).all()


def test_cutout_in_the_augmenter_zeroes_the_normalised_output():
    cfg = AugmentConfig(cutout=4, mean=[0.5] * 3, std=[0.5] * 3)
    aug = Augmenter(cfg, 3, CPU)
    aug.seed(0)
    x = torch.full((8, 3, 16, 16), 255, dtype=torch.uint8)    # normalises to 1.0 everywhere
    out = aug.train(x)
    zeros = (out == 0).all(1).flatten(1).sum(1)
    assert (zeros > 0).all() and (zeros <= 16).all()
    assert ((out == 0) | (out == 1)).all()


def test_random_resized_crop_output_size_and_full_view_identity():
    x = torch.rand(6, 3, 20, 20, generator=_gen(6))
    out = random_resized_crop(x, 9, (0.08, 1.0), _gen(7))
    assert out.shape == (6, 3, 9, 9)
    # the whole image at its own size is returned unchanged
    same = random_resized_crop(x, 20, (1.0, 1.0), _gen(8), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    # a crop keeps values in the input range (bilinear interpolation)
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6


def _box_stats(boxes: torch.Tensor, height: int, width: int) -> dict:
    top, left, h, w = boxes.double().unbind(1)
    return {"area": float((h * w).mean()) / (height * width), "full_width": float((w == width).double().mean()),
            "ratio": float((w / h).log().mean()), "top": float(top.mean()), "left": float(left.mean())}


@pytest.mark.parametrize("scale,height,width", [((0.2, 1.0), 32, 32), ((0.6, 1.0), 8, 8), ((0.08, 1.0), 24, 40)])
def test_random_resized_crop_boxes_match_torchvision_get_params(scale, height, width):
    """Retries then the central fallback, as torchvision: a clamped box would make the crop weaker (larger
    areas, many more full-width crops)."""
    from torchvision.transforms import RandomResizedCrop
    ratio = (3 / 4, 4 / 3)
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    ref = torch.tensor([RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(6000)])
    ours = rrc_boxes(20000, height, width, scale, ratio, _gen(5))
    assert ((ours[:, 2] >= 1) & (ours[:, 0] + ours[:, 2] <= height)).all()
    assert ((ours[:, 3] >= 1) & (ours[:, 1] + ours[:, 3] <= width)).all()
    a, b = _box_stats(ours, height, width), _box_stats(ref, height, width)
    assert a["area"] == pytest.approx(b["area"], abs=0.012)
    assert a["full_width"] == pytest.approx(b["full_width"], abs=0.02)
    assert a["ratio"] == pytest.approx(b["ratio"], abs=0.02)
    assert a["top"] == pytest.approx(b["top"], abs=0.03 * height)
    assert a["left"] == pytest.approx(b["left"], abs=0.03 * width)


@pytest.mark.parametrize("ratio,height,width", [((2.0, 3.0), 10, 10), ((0.2, 0.4), 10, 10), ((0.9, 1.1), 6, 12)])
def test_random_resized_crop_falls_back_to_torchvision_central_crop(ratio, height, width):
    """No draw fits: every image gets torchvision's deterministic fallback box."""
    from torchvision.transforms import RandomResizedCrop
    scale = (1.0, 1.0)
    expected = RandomResizedCrop.get_params(torch.zeros(1, height, width), list(scale), list(ratio))
    boxes = rrc_boxes(50, height, width, scale, ratio, _gen(2))
    if ratio == (0.9, 1.1):      # a 6x12 image, whole area but ratio ~1: never fits, clamped ratio 1.1 -> w 7
        assert expected == (0, 2, 6, 7)
    assert [tuple(b) for b in boxes.tolist()] == [tuple(expected)] * 50


def test_resized_crop_copies_a_box_of_its_own_size():
    x = torch.rand(3, 2, 12, 10, generator=_gen(4))
    boxes = torch.tensor([[0, 0, 5, 5], [7, 5, 5, 5], [3, 2, 5, 5]])
    out = resized_crop(x, boxes, 5)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        assert torch.allclose(out[k], x[k, :, top:top + h, left:left + w], atol=1e-6)


def test_color_jitter_brightness_scales_each_image_within_range():
    x = torch.full((32, 3, 4, 4), 0.5)
    out = color_jitter(x, 0.5, 0.0, 0.0, _gen(9))
    per_image = out.flatten(1)
    assert torch.equal(per_image.min(1).values, per_image.max(1).values)      # one factor per image
    assert (per_image[:, 0] >= 0.25 - 1e-6).all() and (per_image[:, 0] <= 0.75 + 1e-6).all()
    assert len(set(per_image[:, 0].tolist())) > 1
    assert 0 <= float(color_jitter(torch.rand(8, 3, 4, 4), 0.9, 0.9, 0.9, _gen(1)).min())
    assert float(color_jitter(torch.rand(8, 3, 4, 4), 0.9, 0.9, 0.9, _gen(1)).max()) <= 1


def test_grayscale_with_p_one_makes_channels_equal():
    x = torch.rand(4, 3, 6, 6, generator=_gen(10))
    out = random_grayscale(x, 1.0, _gen(11))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(out[:, 0], expected, atol=1e-6)
    assert torch.equal(random_grayscale(x, 0.0, _gen(11)), x)


def test_test_transform_centre_crops_images_larger_than_the_training_crop():
    """ImageNet train images are kept at 256 for random-resized crops; herding and prototypes see them through
    the test transform, which must give the 224 centre crop (Resize(256) + CenterCrop(224))."""
    cfg = AugmentConfig(random_resized_crop=4, mean=[0.0], std=[1.0])
    aug = Augmenter(cfg, channels=1, device=torch.device("cpu"))
    images = torch.arange(36, dtype=torch.uint8).view(1, 1, 6, 6)
    out = aug.test(images)
    assert out.shape == (1, 1, 4, 4)
    assert torch.equal(out * 255, images[..., 1:5, 1:5].float())
    assert aug.test(images[..., :4, :4]).shape == (1, 1, 4, 4)     # already at crop size: unchanged
