"""The card's backbone section, checked when a run is resolved, and its weights file.

`check_backbone` refuses, in one line and before anything runs, a backbone name neither a factory ResNet nor a
timm model, a `width` for a timm model, and a backbone that lacks what the method needs (`Method.backbone_needs`:
SEED's experts and DER's physical pruning need a factory ResNet, EXACFS stage maps); it returns the provenance
config.yaml records (timm model and version, the weights file and its sha256).

`backbone: {pretrained: <file>}` loads weights from a local file into the card's backbone (timm or factory): a
state_dict, a timm training checkpoint ({"state_dict": ...}) or a .safetensors file; strict about keys except the
classifier's. A factory ResNet also takes torchvision's (= timm's) ResNet names.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from cilbench.errors import UserError
from cilbench.kit.backbones import STANDARD, build_backbone
from cilbench.kit.timm_backbones import (
    PREFIX,
    TimmBackbone,
    check_model_name,
    check_timm_kwargs,
    classifier_prefixes,
    describe_timm,
    first_conv,
    is_timm,
    timm_version,
)

# What a method may need from a backbone beyond pooled features, and what it means (messages and docs).
# "no_pretrained": the method builds its networks itself, so a card's pretrained file cannot apply.
CAPABILITIES = {
    "factory": "one of cilbench's own ResNets (built from a channel spec)",
    "stage_maps": "stage maps (timm's forward_intermediates and feature_info)",
}


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
        else:   # tensors and plain data only; timm's train.py also stores its argparse.Namespace of options
            with torch.serialization.safe_globals([argparse.Namespace]):
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
                  input_conv: str | None, what: str, path: str) -> dict[str, torch.Tensor]:
    """The file's tensors for every key of the target (`shapes`), or a one-line error naming the missing,
    unexpected and mis-shaped keys. The classifier's keys of the file are dropped (the backbone has none);
    a missing BatchNorm `num_batches_tracked` counter is allowed (it only counts steps). A first conv trained
    on 3-channel images is adapted to the data's channels as timm does (channels summed for 1)."""
    def is_classifier(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") for c in classifier)

    state = dict(state)
    conv_key = f"{input_conv}.weight" if input_conv else None
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
        return net.model, state, classifier_prefixes(net.model), first_conv(net.model)
    return net, factory_names(state), ("fc",), "stem.0"


def fitted_weights(net: nn.Module, path: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The module of backbone `net` a weights file loads into (a TimmBackbone's timm model, or a factory ResNet)
    and the file's tensors for it (a factory ResNet takes its own names or torchvision's/timm's ResNet names),
    or a one-line error where they do not fit."""
    target, state, classifier, input_conv = _target_names(net, read_weights(path))
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    return target, match_weights(state, shapes, classifier, input_conv, f"backbone '{net.spec['name']}'", path)


def load_pretrained(net: nn.Module, path: str) -> nn.Module:
    """Load a local weights file into a backbone, strictly (fitted_weights)."""
    target, weights = fitted_weights(net, path)
    target.load_state_dict(weights, strict=False)    # every key checked; only BN step counters may be absent
    return net


def check_backbone_config(backbone, where: str) -> None:
    """The card's backbone section: a factory ResNet name, or timm:<model> of a model the installed timm has,
    without `width` and with timm_kwargs cilbench does not set itself. `where` names the card."""
    where = f"{where}: backbone"
    if is_timm(backbone.name):
        check_model_name(backbone.name, f"{where}.name")
        check_timm_kwargs(backbone.timm_kwargs, f"{where}.timm_kwargs")
        if backbone.width:
            raise UserError(f"{where}.width: a timm model has its own widths ({backbone.name}); remove width, "
                            "or pass the model's own argument through backbone.timm_kwargs")
        return
    if backbone.name not in STANDARD:
        from cilbench.config import did_you_mean
        raise UserError(f"{where}.name: unknown backbone '{backbone.name}'{did_you_mean(backbone.name, STANDARD)}; "
                        f"known: {', '.join(STANDARD)}, or timm:<model> for any timm model")
    if backbone.timm_kwargs:
        raise UserError(f"{where}.timm_kwargs: only for timm:<model> backbones, not '{backbone.name}'; remove it")


def check_backbone(backbone, in_channels: int, method: str, needs: dict[str, str], where: str) -> dict:
    """Resolve-time check of the card's backbone (check_backbone_config) against the data and the method: the
    timm model takes these timm_kwargs, the pretrained file exists and fits, and the method needs nothing the
    backbone lacks. Returns the provenance config.yaml records."""
    check_backbone_config(backbone, where)
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
        provenance.update(timm_model=name[len(PREFIX):], timm_version=timm_version())
    if pretrained:
        with torch.device("meta"):
            net = build_backbone(name, in_channels, backbone.width, timm_kwargs=backbone.timm_kwargs)
        fitted_weights(net, pretrained)
        provenance.update(pretrained=os.fspath(Path(pretrained).expanduser().resolve()),
                          pretrained_sha256=file_sha256(pretrained))
    return provenance
