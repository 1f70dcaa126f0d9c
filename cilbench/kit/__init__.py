"""The method kit: the one door through which a method — built-in or a researcher's own — reaches cilbench.

    from cilbench.kit import Context, Method, Footprint, Task, option, register

Everything a method may use is exported here: the contract (Method, Context, Footprint, register, option),
the task and configs it receives, the engine helpers (phase configs, full-precision statistics), backbones,
heads and nets, vision-transformer pieces, losses, pruning, Gaussians and feature significance, memory types,
and UserError for a one-line message to the user. Methods import nothing else from cilbench (a test checks the
built-ins).
"""
from cilbench.data.augment import Augmenter
from cilbench.data.protocol import AugmentConfig, TrainConfig
from cilbench.data.stream import Task
from cilbench.errors import UserError
from cilbench.kit.backbone_card import load_pretrained
from cilbench.kit.backbones import (
    STANDARD,
    BackbonePart,
    build_backbone,
    build_from_spec,
    count_params,
    default_shared_stages,
    split_backbone,
    stage_channels,
    stage_outputs,
    standard_spec,
)
from cilbench.kit.contract import (
    ConcatExtractorMethod,
    Context,
    Footprint,
    Method,
    NoOptions,
    OneNetworkMethod,
    describe_options,
    option,
)
from cilbench.kit.gaussians import EPS_START, GaussianStore
from cilbench.kit.losses import (
    aux_labels,
    balanced_kd,
    batch_class_counts,
    effective_number_weights,
    ht_multiplier,
    kd_soft_ce,
    logit_adjusted_ce,
    nca_margin_loss,
    pcd_loss,
    pcr_hc_loss,
    pcr_loss,
    scd_loss,
    supcon_distinct,
)
from cilbench.kit.nets import (
    ExtractorStack,
    HeadInit,
    LocalSimilarityHead,
    ProjectionHead,
    drop_columns,
    expand_head,
    freeze,
    frozen_forward,
    is_frozen,
    kmeans,
    linear_head,
    pack_module,
    proxy_head,
    snapshot,
    tie_parameters,
    trainable_copy,
    unpack_module,
    weight_align,
)
from cilbench.kit.pruning import ChannelMasks, anneal, describe, prune, regrow
from cilbench.kit.registry import register
from cilbench.kit.significance import (
    class_gradient_significance,
    ema_significance,
    normalise_significance,
    significance_distillation,
    significance_summary,
    significance_weights,
    uniform_like,
)
from cilbench.kit.timm_backbones import TimmBackbone, is_timm
from cilbench.kit.transformers import (
    ClassAttention,
    ClassAttentionBlock,
    PatchEncoder,
    SelfAttentionBlock,
    decay_groups,
    drop_path_rates,
    init_vit_weights,
)
from cilbench.train.engine import features_with_flips, full_precision, phase_config, warmup_length
from cilbench.train.memory import ExemplarMemory, ReplayBatch, ReservoirMemory

__all__ = [
    # the contract
    "Context", "Footprint", "Method", "NoOptions", "OneNetworkMethod", "ConcatExtractorMethod", "register",
    "option", "describe_options", "Task", "TrainConfig", "AugmentConfig", "Augmenter", "UserError",
    # engine helpers
    "phase_config", "warmup_length", "full_precision", "features_with_flips",
    # memory
    "ExemplarMemory", "ReservoirMemory", "ReplayBatch",
    # backbones and nets
    "STANDARD", "build_backbone", "count_params", "stage_channels", "stage_outputs", "standard_spec",
    "TimmBackbone", "is_timm", "load_pretrained",
    "BackbonePart", "split_backbone", "default_shared_stages", "build_from_spec",
    "ExtractorStack", "HeadInit", "LocalSimilarityHead", "ProjectionHead", "drop_columns", "expand_head",
    "freeze", "frozen_forward", "is_frozen", "kmeans", "linear_head", "proxy_head", "snapshot", "trainable_copy",
    "tie_parameters", "pack_module", "unpack_module", "weight_align",
    # losses
    "aux_labels", "balanced_kd", "batch_class_counts", "effective_number_weights", "ht_multiplier", "kd_soft_ce",
    "logit_adjusted_ce", "nca_margin_loss", "pcd_loss",
    "pcr_hc_loss", "pcr_loss", "scd_loss", "supcon_distinct",
    # pruning, Gaussians, feature significance
    "ChannelMasks", "anneal", "describe", "prune", "regrow", "EPS_START", "GaussianStore",
    "class_gradient_significance", "ema_significance", "normalise_significance", "significance_distillation",
    "significance_summary", "significance_weights", "uniform_like",
    # vision-transformer pieces (timm layers)
    "ClassAttention", "ClassAttentionBlock", "PatchEncoder", "SelfAttentionBlock", "decay_groups",
    "drop_path_rates", "init_vit_weights",
]
