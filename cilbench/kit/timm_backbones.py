"""Backbones from timm: a card's `backbone: {name: "timm:<model>"}`.

Any timm model becomes a feature extractor: created with `num_classes=0` (pooled features, no classifier),
`in_chans` from the data set, never `pretrained=True` (a run never downloads; weights come from a local file,
cilbench/kit/backbone_card.py), with optional `timm_kwargs` passed to `timm.create_model` (e.g. `img_size`,
`drop_path_rate`). Its feature width is the model's own (`head_hidden_size` where timm sets it, else
`num_features`), and it keeps timm's own initialisation.

The spec of a timm backbone is {"name": "timm:<model>", "in_channels": c, "timm_kwargs": {...}}, so
`build_backbone(spec)` and the checkpoint format (nets.pack_module / unpack_module) rebuild it like a factory
ResNet. Stage maps (`stage_outputs`, EXACFS) come from timm's `forward_intermediates`, one map per entry of the
model's `feature_info` (a timm ResNet lists its stem first).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json

import torch
from torch import nn

from cilbench.errors import UserError

PREFIX = "timm:"
# create_model arguments cilbench sets itself: a card's timm_kwargs may not name them
RESERVED_KWARGS = ("pretrained", "num_classes", "in_chans", "checkpoint_path", "pretrained_cfg",
                   "pretrained_cfg_overlay", "cache_dir", "features_only")


def is_timm(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def timm_spec(name: str, in_channels: int = 3, timm_kwargs: dict | None = None) -> dict:
    return {"name": name, "in_channels": in_channels, "timm_kwargs": dict(timm_kwargs or {})}


def _timm():
    import timm  # imported on first use: runs on factory backbones never pay for it
    return timm


def check_model_name(name: str, where: str = "backbone.name") -> str:
    """The timm model name of 'timm:<model>', or a one-line error naming close timm models."""
    model = name[len(PREFIX):]
    timm = _timm()
    if not model or not timm.is_model(model):
        from cilbench.config import did_you_mean
        raise UserError(f"{where}: timm {timm.__version__} has no model '{model}'"
                        f"{did_you_mean(model, timm.list_models(), PREFIX)}; list them with "
                        "python -c \"import timm; print(timm.list_models('resnet*'))\"")
    return model


def check_timm_kwargs(kwargs: dict, where: str = "backbone.timm_kwargs") -> None:
    reserved = sorted(set(kwargs) & set(RESERVED_KWARGS))
    if reserved:
        raise UserError(f"{where}: '{reserved[0]}' is set by cilbench (features only, in_chans from the data, "
                        "weights from backbone.pretrained); remove it")


def create_timm_model(spec: dict, meta: bool = False) -> nn.Module:
    """timm.create_model for a timm spec: features only, the spec's input channels, no download. `meta`: on the
    meta device (no memory, no init cost), to read widths and keys when a run is resolved."""
    model = check_model_name(spec["name"])
    kwargs = spec.get("timm_kwargs") or {}
    check_timm_kwargs(kwargs)
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return _timm().create_model(model, pretrained=False, num_classes=0,
                                        in_chans=spec["in_channels"], **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"backbone '{spec['name']}' with timm_kwargs {kwargs}: timm refused it ({text[:200]}); "
                        "fix backbone.timm_kwargs") from None


def feature_width(model: nn.Module) -> int:
    """Width of the pooled feature a features-only timm model returns."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def has_stage_maps(model: nn.Module) -> bool:
    return hasattr(model, "forward_intermediates") and bool(getattr(model, "feature_info", None))


class TimmBackbone(nn.Module):
    """A timm model as a cilbench feature extractor: image -> pooled feature of width `out_dim`."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = copy.deepcopy(spec)
        self.model = create_timm_model(spec)
        self.out_dim = feature_width(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def stage_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every feature level's map (NCHW) and the pooled feature, in one forward pass."""
        if not has_stage_maps(self.model):
            raise UserError(f"backbone '{self.spec['name']}': this timm model gives no stage maps "
                            "(no forward_intermediates); use a factory backbone")
        final, maps = self.model.forward_intermediates(x)
        return list(maps), self.model.forward_head(final, pre_logits=True)

    def stage_channels(self) -> list[int]:
        return [int(level["num_chs"]) for level in self.model.feature_info]


@functools.lru_cache(maxsize=16)
def _describe(name: str, in_channels: int, kwargs_json: str) -> dict:
    model = create_timm_model(timm_spec(name, in_channels, json.loads(kwargs_json)), meta=True)
    return {"out_dim": feature_width(model), "stage_maps": has_stage_maps(model)}


def describe_timm(name: str, in_channels: int, timm_kwargs: dict | None = None) -> dict:
    """Feature width and stage-map support of a timm backbone, from a meta-device build
    (cached: a sweep resolves many runs of one card)."""
    return _describe(name, in_channels, json.dumps(timm_kwargs or {}, sort_keys=True))


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def first_conv(model: nn.Module) -> str | None:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    return names if isinstance(names, str) else None


def timm_version() -> str:
    return _timm().__version__
