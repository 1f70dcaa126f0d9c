"""Measurement paths (evaluation, herding, Gaussian statistics, significance) run in true float32 on every
device: autocast off and TF32 off for cuDNN convolutions and CUDA matmuls, restored afterwards. The flags are
global Python settings, so the CUDA logic is checked here on the CPU."""
from __future__ import annotations

import torch

from cilbench.train.engine import _fp32_switches, full_precision


def _flags() -> list:
    return [getattr(obj, name) for obj, name in _fp32_switches()]


def test_full_precision_turns_tf32_and_autocast_off_and_restores_them():
    before = _flags()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with full_precision(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert all(v in ("ieee", False) for v in _flags())
            y = torch.nn.functional.linear(torch.randn(4, 8), torch.randn(3, 8))
            assert y.dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
    assert _flags() == before


def test_full_precision_restores_the_flags_after_an_error():
    before = _flags()
    try:
        with full_precision(torch.device("cpu")):
            raise ValueError("inside")
    except ValueError:
        pass
    assert _flags() == before


def test_engine_inference_runs_inside_full_precision(monkeypatch):
    from harness import tiny_card, tiny_context
    ctx, stream, engine, _ = tiny_context(tiny_card())
    seen = []

    def probe(x):
        seen.append((_flags(), torch.is_autocast_enabled("cpu")))
        return x.flatten(1)[:, :2]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engine.apply(probe, stream.task(0).train_idx[:5])
    assert out.dtype == torch.float32 and seen
    assert all(all(v in ("ieee", False) for v in flags) and not autocast for flags, autocast in seen)
