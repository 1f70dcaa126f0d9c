"""Backbones from timm and backbone weights from a local file.

A card's `backbone: {name: "timm:<model>"}` builds any timm model as a feature extractor: created with
`num_classes=0` (pooled features, no classifier), `in_chans` from the data set, never `pretrained=True` (a run
never downloads), with optional `timm_kwargs` passed to `timm.create_model` (e.g. `img_size`, `drop_path_rate`).
Its feature width is the model's own (`head_hidden_size` where timm sets it, else `num_features`).

The spec of a timm backbone is {"name": "timm:<model>", "in_channels": c, "timm_kwargs": {...}}, so
`build_backbone(spec)` and the checkpoint format (nets.pack_module / unpack_module) rebuild it like a factory
ResNet. Stage maps (`stage_outputs`, EXACFS) come from timm's `forward_intermediates`, one map per entry of the
model's `feature_info` (a timm ResNet lists its stem first). What only cilbench's own ResNets offer (SEED's
experts, DER's physical pruning) is refused when the run is resolved (`check_backbone`).

`backbone: {pretrained: <file>}` loads weights from a local file into the card's backbone (timm or factory): a
state_dict, a timm training checkpoint ({"state_dict": ...}) or a .safetensors file; strict about keys except the
classifier's; recorded in config.yaml by sha256 (`backbone_provenance`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from cilbench.errors import UserError

PREFIX = "timm:"
# create_model arguments cilbench sets itself: a card's timm_kwargs may not name them
RESERVED_KWARGS = ("pretrained", "num_classes", "in_chans", "checkpoint_path", "pretrained_cfg",
                   "pretrained_cfg_overlay", "cache_dir", "features_only")
# What a method may need from a backbone beyond pooled features, and what it means (messages and docs).
# "no_pretrained": the method builds its networks itself, so a card's pretrained file cannot apply.
CAPABILITIES = {
    "factory": "one of cilbench's own ResNets (built from a channel spec)",
    "stage_maps": "stage maps (timm's forward_intermediates and feature_info)",
}


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


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _first_conv(model: nn.Module) -> str | None:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    return names if isinstance(names, str) else None


# --------------------------------------------------------------------------------------------------------
# Weights from a local file

def _file_key(path: str) -> tuple[str, int, int]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"backbone.pretrained: {path} not found; give the path of a local weights file "
                        "(a state_dict, a timm checkpoint or .safetensors; runs never download weights)")
    stat = p.stat()
    return str(p.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    return _sha256(*_file_key(path))


@functools.lru_cache(maxsize=1)
def _read_weights(path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # not a weights file, pickled objects beyond tensors, a truncated file, ...
        raise UserError(f"backbone.pretrained: {path} could not be read as weights ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:160]}); give a state_dict, timm checkpoint or .safetensors "
                        "file") from None
    for key in ("state_dict", "model", "module"):     # a timm training checkpoint or a wrapped state_dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"backbone.pretrained: {path} holds no state_dict (a mapping of names to tensors, or a "
                        "checkpoint with one under 'state_dict')")
    if all(k.startswith("module.") for k in obj):    # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in a local weights file (cached while the file is unchanged)."""
    return _read_weights(*_file_key(path))


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def match_weights(state: dict[str, torch.Tensor], shapes: dict[str, tuple], classifier: tuple[str, ...],
                  first_conv: str | None, what: str, path: str) -> dict[str, torch.Tensor]:
    """The file's tensors for every key of the target (`shapes`), or a one-line error naming the missing,
    unexpected and mis-shaped keys. The classifier's keys of the file are dropped (the backbone has none);
    a missing BatchNorm `num_batches_tracked` counter is allowed (it only counts steps). A first conv trained
    on 3-channel images is adapted to the data's channels as timm does (channels summed for 1)."""
    def is_classifier(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") for c in classifier)

    state = dict(state)
    conv_key = f"{first_conv}.weight" if first_conv else None
    if conv_key in state and conv_key in shapes and tuple(state[conv_key].shape) != shapes[conv_key]:
        want, have = shapes[conv_key], tuple(state[conv_key].shape)
        if len(want) == 4 and want[0] == have[0] and want[2:] == have[2:]:
            from timm.models import adapt_input_conv
            state[conv_key] = adapt_input_conv(want[1], state[conv_key].float()).to(state[conv_key].dtype)
    missing = [k for k in shapes if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in shapes and not is_classifier(k)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {shapes[k]}" for k in shapes
             if k in state and tuple(state[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        parts = [f"{label} {len(keys)} key(s): {_short(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise UserError(f"backbone.pretrained: {path} does not fit {what}: {'; '.join(parts)}; give weights of "
                        "this architecture")
    return {k: state[k] for k in shapes if k in state}


def _torchvision_stage(match: re.Match) -> str:
    return f"stages.{int(match.group(1)) - 1}."


def factory_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ResNet state_dict in torchvision's (= timm's) names (conv1, bn1, layer1-4, downsample, fc) renamed to
    the factory ResNet's (stem.0, stem.1, stages.0-3, shortcut); a state_dict in factory names is returned as
    is. The classifier `fc` keeps its name (it is dropped when loaded)."""
    if not any(k.startswith("layer1.") for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^conv1\.", "stem.0.", re.sub(r"^bn1\.", "stem.1.", key))
        key = re.sub(r"^layer(\d+)\.", _torchvision_stage, key).replace(".downsample.", ".shortcut.")
        renamed[key] = value
    return renamed


def _target_names(net: nn.Module, state: dict) -> tuple[nn.Module, dict, tuple[str, ...], str | None]:
    """The module a weights file loads into, the file's state in its names, its classifier and first conv."""
    if isinstance(net, TimmBackbone):
        return net.model, state, _classifier_prefixes(net.model), _first_conv(net.model)
    return net, factory_names(state), ("fc",), "stem.0"


def fitted_weights(net: nn.Module, path: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The module of backbone `net` a weights file loads into (a TimmBackbone's timm model, or a factory ResNet)
    and the file's tensors for it (a factory ResNet takes its own names or torchvision's/timm's ResNet names),
    or a one-line error where they do not fit."""
    target, state, classifier, first_conv = _target_names(net, read_weights(path))
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    return target, match_weights(state, shapes, classifier, first_conv, f"backbone '{net.spec['name']}'", path)


def load_pretrained(net: nn.Module, path: str) -> nn.Module:
    """Load a local weights file into a backbone, strictly (fitted_weights)."""
    target, weights = fitted_weights(net, path)
    target.load_state_dict(weights, strict=False)    # every key checked; only BN step counters may be absent
    return net


def check_backbone(backbone, in_channels: int, method: str, needs: dict[str, str]) -> dict:
    """Resolve-time check of the card's backbone against the data and the method: the timm model exists and
    takes these timm_kwargs, `width` is not set for it, the pretrained file exists and fits, and the method
    needs nothing the backbone lacks. Returns the provenance config.yaml records."""
    name, pretrained = backbone.name, backbone.pretrained
    provenance: dict = {}
    if pretrained and "no_pretrained" in needs:
        raise UserError(f"method '{method}' {needs['no_pretrained']}, so backbone.pretrained cannot apply; "
                        "remove it")
    if is_timm(name):
        info = describe_timm(name, in_channels, backbone.timm_kwargs)
        offers = {"stage_maps"} if info["stage_maps"] else set()
        for need, why in needs.items():
            if need in CAPABILITIES and need not in offers:
                raise UserError(f"method '{method}': {why} needs {CAPABILITIES[need]}, which timm backbone "
                                f"'{name}' lacks; use a factory backbone (backbone.name=resnet32, ...) or change "
                                "that option")
        provenance.update(timm_model=name[len(PREFIX):], timm_version=_timm().__version__)
    if pretrained:
        from cilbench.kit.backbones import build_backbone
        with torch.device("meta"):
            net = build_backbone(name, in_channels, backbone.width, timm_kwargs=backbone.timm_kwargs)
        fitted_weights(net, pretrained)
        provenance.update(pretrained=os.fspath(Path(pretrained).expanduser().resolve()),
                          pretrained_sha256=file_sha256(pretrained))
    return provenance
