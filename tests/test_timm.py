"""timm backbones (`backbone.name: timm:<model>`) and backbone weights from a local file (`backbone.pretrained`):
feature width from the model, runs and resume on digits, checkpoints, bit-identical weights, one-line errors,
no network, and the ImageNet cards' ResNet-18 against torchvision's and timm's."""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import socket

import pytest
import timm
import torch
import yaml
from harness import tiny_card, tiny_context

from cilbench.errors import UserError
from cilbench.kit import ExtractorStack, build_backbone, count_params, stage_channels, stage_outputs
from cilbench.kit.backbone_card import load_pretrained
from cilbench.kit.nets import pack_module, unpack_module

TINY = "timm:test_resnet"          # timm's own test model: 0.37M parameters, 96-d features
TIMM_SET = ["--set", f"backbone.name={TINY}", "--epochs", "1"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection, or any of timm's / torch.hub's download functions, fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    import timm.models._builder as builder
    import timm.models._hub as hub
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for module, name in [(builder, "load_state_dict_from_url"), (builder, "download_cached_file"),
                         (builder, "load_state_dict_from_hf"), (hub, "download_cached_file"),
                         (hub, "hf_hub_download"), (torch.hub, "load_state_dict_from_url"),
                         (torch.hub, "download_url_to_file")]:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _randomise_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """BatchNorm statistics and affine parameters away from their defaults, so copies are really compared."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


# --- the backbone ---------------------------------------------------------------------------------------------

def test_feature_width_and_channels_come_from_the_model():
    net = build_backbone(TINY, in_channels=1)
    x = torch.randn(2, 1, 8, 8)
    assert net.out_dim == net.model.num_features == 96 == net(x).shape[1]
    assert net.model.conv1[0].in_channels == 1 and not hasattr(net.model.fc, "weight")   # features only
    vit = build_backbone("timm:test_vit", 1, timm_kwargs={"img_size": 8, "patch_size": 2})
    assert vit.out_dim == vit.model.num_features == 64 == vit(x).shape[1]


def test_stage_maps_and_checkpoint_round_trip():
    net = _randomise_bn(build_backbone(TINY, 1), 0).eval()
    x = torch.randn(3, 1, 8, 8)
    maps, pooled = stage_outputs(net, x)
    assert [m.shape[1] for m in maps] == stage_channels(net) == [32, 32, 48, 192, 96]   # feature_info levels
    assert torch.allclose(pooled, net(x), atol=1e-6)
    last = copy.deepcopy(net).to(memory_format=torch.channels_last)  # what engine.prepare does on CUDA
    assert torch.allclose(last(x.contiguous(memory_format=torch.channels_last)), net(x), atol=1e-5)
    back = unpack_module(pack_module(net), "cpu").eval()            # rebuilt from the spec, as on --resume
    assert type(back) is type(net) and torch.equal(back(x), net(x))
    stack = ExtractorStack()
    stack.add(net, frozen=True)
    stack.add(build_backbone(TINY, 1))
    again = unpack_module(pack_module(stack), "cpu")
    assert again.dims == [96, 96] and again.frozen == [True, False] and torch.equal(again.eval()(x), stack.eval()(x))


# --- weights from a local file ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["timm_checkpoint", "ddp_state_dict", "safetensors"])
def test_pretrained_file_gives_bit_identical_weights(tmp_path, layout):
    torch.manual_seed(3)
    source = _randomise_bn(timm.create_model("test_resnet", num_classes=7, in_chans=3), 1)   # with a classifier
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "ddp_state_dict":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
        torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": state, "optimizer": optimizer.state_dict(),
                    "args": argparse.Namespace(model="test_resnet", lr=0.1), "version": 2}, path)   # timm's train.py
    card = tiny_card(backbone={"name": TINY, "width": 0, "pretrained": str(path)})
    ctx, *_ = tiny_context(card)
    net = ctx.new_backbone()
    loaded = net.model.state_dict()
    assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_three_channel_weights_adapt_to_one_channel_data(tmp_path):
    source = timm.create_model("test_resnet", num_classes=0, in_chans=3)
    torch.save(source.state_dict(), tmp_path / "rgb.pth")
    net = load_pretrained(build_backbone(TINY, 1), str(tmp_path / "rgb.pth"))
    assert torch.allclose(net.model.conv1[0].weight, source.conv1[0].weight.sum(dim=1, keepdim=True))


# --- runs -----------------------------------------------------------------------------------------------------

def test_der_runs_with_a_timm_backbone_and_resumes_identically(tmp_path, run_cli):
    full = tmp_path / "full"
    res = run_cli("der", "digits_b0s2", full, *TIMM_SET)
    assert res.exit_code == 0, res.output
    run = full / "digits_b0s2" / "der" / "seed0"
    steps = _rows(run / "steps.csv")
    per_extractor = count_params(build_backbone(TINY, 1))
    assert [int(s["params_backbone"]) for s in steps] == [per_extractor * (t + 1) for t in range(5)]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["protocol"]["backbone"]["name"] == TINY and config["protocol"]["backbone"]["width"] == 0
    assert config["backbone_provenance"] == {"timm_model": "test_resnet", "timm_version": timm.__version__}

    split = tmp_path / "split"
    assert run_cli("der", "digits_b0s2", split, *TIMM_SET, "--stop-after", "2").exit_code == 0
    res = run_cli("der", "digits_b0s2", split, *TIMM_SET, "--resume")
    assert res.exit_code == 0, res.output
    resumed = split / "digits_b0s2" / "der" / "seed0"
    assert (resumed / "acc_matrix.csv").read_text() == (run / "acc_matrix.csv").read_text()


def test_replay_runs_with_a_pretrained_timm_backbone(tmp_path, run_cli):
    weights = tmp_path / "test_resnet_1ch.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10, in_chans=1).state_dict(), weights)
    res = run_cli("replay", "digits_b0s2", tmp_path / "runs", *TIMM_SET, "--set", f"backbone.pretrained={weights}")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "digits_b0s2" / "replay" / "seed0"
    assert len(_rows(run / "steps.csv")) == 5
    provenance = yaml.safe_load((run / "config.yaml").read_text())["backbone_provenance"]
    assert provenance["pretrained_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert provenance["timm_model"] == "test_resnet" and provenance["pretrained"] == str(weights.resolve())
    from cilbench.report.aggregate import group_runs
    from cilbench.run.rundir import scan_runs
    (group,) = group_runs(scan_runs(tmp_path / "runs"))["digits_b0s2"]
    assert group.backbone == f"{TINY}, pretrained" and group.backbone_standard is None   # never beside a paper's row


# --- one-line errors ------------------------------------------------------------------------------------------

def _weights_file(tmp_path, kind: str) -> str:
    """A file that is no weights file of test_resnet on digits (or none at all: 'nowhere')."""
    path = tmp_path / f"{kind}.pth"
    if kind == "other_model":
        torch.save(timm.create_model("test_byobnet", num_classes=0, in_chans=1).state_dict(), path)
    elif kind == "not_weights":
        path.write_text("not a weights file\n")
    elif kind == "without_layer4":
        state = timm.create_model("test_resnet", num_classes=0, in_chans=1).state_dict()
        torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, path)
    return str(path)


@pytest.mark.parametrize("method, extra, weights, expected", [
    ("der", ["--set", "backbone.name=timm:no_such_net"], None, "has no model 'no_such_net'"),
    ("der", [], "nowhere", "not found; give the path of a local weights file"),
    ("der", [], "other_model", "does not fit backbone 'timm:test_resnet': missing"),
    ("der", [], "without_layer4", "key(s): layer4.0."),
    ("der", [], "not_weights", "could not be read as weights"),
    ("der", ["--set", "backbone.width=8"], None, "backbone.width: a timm model has its own widths"),
    ("der", ["--set", "backbone.timm_kwargs={in_chans: 3}"], None, "'in_chans' is set by cilbench"),
    ("der_prune", [], None, "method 'der_prune': prune (physical channel pruning"),
    ("seed", [], None, "method 'seed': seed.backbone=card"),
])
def test_bad_input_is_one_line(tmp_path, run_cli, error_line, nothing_complete, method, extra, weights, expected):
    if weights:
        extra = [*extra, "--set", f"backbone.pretrained={_weights_file(tmp_path, weights)}"]
    res = run_cli(method, "digits_b0s2", tmp_path / "runs", *TIMM_SET, *extra)
    assert res.exit_code == 2, res.output
    assert expected in error_line(res)
    assert nothing_complete(tmp_path / "runs") and not (tmp_path / "runs" / "digits_b0s2").exists()


def test_pretrained_for_another_architecture_than_the_method_builds(tmp_path):
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp_path / "w.pth")
    ctx, *_ = tiny_context(tiny_card(backbone={"name": TINY, "width": 0, "pretrained": str(tmp_path / "w.pth")}))
    with pytest.raises(UserError, match="weights file is for 'timm:test_resnet', but the method builds 'resnet20'"):
        ctx.new_backbone("resnet20")


# --- the ImageNet cards' ResNet-18 ----------------------------------------------------------------------------

def test_resnet18_imagenet_is_torchvision_and_timm_resnet18(tmp_path):
    """Same parameters under a one-to-one renaming (conv1/bn1/layerN/downsample <-> stem/stages/shortcut), same
    count, and the same features with copied weights, to float precision."""
    import torchvision
    tv = _randomise_bn(torchvision.models.resnet18(), 5).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")           # with torchvision's fc, dropped when loaded
    ours = load_pretrained(build_backbone("resnet18_imagenet"), str(tmp_path / "tv.pth")).eval()
    tm = timm.create_model("resnet18", num_classes=0).eval()
    tm.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    tv.fc = torch.nn.Identity()
    assert list(tm.state_dict()) == list(tv.state_dict()) and len(ours.state_dict()) == len(tv.state_dict())
    assert count_params(ours) == count_params(tv) == count_params(tm) == 11_176_512
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b, c = ours(x), tv(x), tm(x)
    assert a.shape == (2, 512)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5) and torch.allclose(a, c, rtol=1e-5, atol=1e-5)


def test_resume_compares_the_weights_hash_not_the_path():
    from cilbench.run.runner import _check_same_config
    stored = {"protocol": {"backbone": {"name": TINY, "pretrained": "/a/w.pth"}},
              "backbone_provenance": {"timm_model": "test_resnet", "timm_version": "1.0.30",
                                      "pretrained": "/a/w.pth", "pretrained_sha256": "aa"}}
    moved = {"protocol": {"backbone": {"name": TINY, "pretrained": "/b/w.pth"}},
             "backbone_provenance": {"timm_model": "test_resnet", "timm_version": timm.__version__,
                                     "pretrained": "/b/w.pth", "pretrained_sha256": "aa"}}
    _check_same_config(stored, moved)
    moved["backbone_provenance"]["pretrained_sha256"] = "bb"
    with pytest.raises(UserError, match="'backbone_provenance.pretrained_sha256' is 'bb' now but 'aa'"):
        _check_same_config(stored, moved)


def test_exacfs_needs_stage_maps_of_a_timm_model(monkeypatch):
    from cilbench.run.runner import RunRequest, resolve
    request = RunRequest(method="exacfs", protocol="digits_b0s2", overrides=[f"backbone.name={TINY}"])
    assert resolve(request).config["backbone_provenance"]["timm_model"] == "test_resnet"   # timm gives them
    monkeypatch.setattr("cilbench.kit.backbone_card.describe_timm", lambda *a: {"out_dim": 96, "stage_maps": False})
    with pytest.raises(UserError, match="method 'exacfs': its stage-map distillation needs stage maps"):
        resolve(request)
    request.overrides.append("exacfs.backbone=resnet20")          # EXACFS's own factory backbone needs none
    assert resolve(request).config["backbone_provenance"]["timm_model"] == "test_resnet"
