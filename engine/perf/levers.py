"""The speed levers, each a switch that changes how fast a step runs, never what it computes: layers kept out
of checkpointing, expanded double quant, 4-bit weights dequantized in the graph, the training LoRA forwards,
compiled layers with their recompute inside the graph. `apply_speed_levers` applies a plan's switches in the
order they need (compile last: it compiles what the others set up)."""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from decode.forward import causal_lm
from engine.config import TrainConfig
from engine.errors import UserError
from engine.perf.lora_forward import set_lora_forward


def keep_activations(model, n: int) -> None:
    """Checkpoint every decoder layer but the last `n`: backward reads their saved activations instead
    of running their forward again. The last layers, because backward reaches them first and frees their
    activations before it recomputes any checkpointed layer. Call again with another `n` to change it."""

    layers = causal_lm(model).get_decoder().layers
    if n > len(layers):
        raise UserError(f"train.keep_activations: {n} is more than the model's {len(layers)} layers")
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        GradientCheckpointingLayer = None
    if GradientCheckpointingLayer is None or not isinstance(layers[0], GradientCheckpointingLayer):
        raise UserError("train.keep_activations needs per-layer gradient checkpointing (transformers >= 4.52)")
    for i, layer in enumerate(layers):
        flag = "recompute" if isinstance(layer, RecomputeInGraph) else "gradient_checkpointing"
        setattr(layer, flag, i < len(layers) - n)


def expand_double_quant(model) -> int:
    """Store the block scales (absmax) of every double-quantized 4-bit weight as the fp32 values
    bitsandbytes dequantizes them to at each use, so no matmul dequantizes them again. Returns the count
    of weights changed; the weights themselves stay 4-bit and compute bit for bit the same."""
    import bitsandbytes.functional as bnbf

    changed = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is None or not state.nested:
            continue
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)  # bitsandbytes' own steps, once
        absmax += state.offset
        state.absmax, state.state2, state.offset, state.nested = absmax.float(), None, None, False
        changed += 1
    return changed


def apply_speed_levers(model, train: TrainConfig):
    """The recipe's switches that change how fast a step runs, never what it computes: layers kept out
    of checkpointing, expanded double quant, 4-bit weights dequantized in the graph, the fused LoRA update
    and dropout, compiled layers (last: it compiles what the others set up). The recipe's validation allows
    keep_activations only with gradient checkpointing."""
    if train.keep_activations:
        keep_activations(model, train.keep_activations)
    if train.expand_double_quant:
        expand_double_quant(model)
    if train.dequant_in_graph:
        from engine.perf.nf4 import dequantize_in_graph  # torch.library.triton_op: PyTorch >= 2.6
        dequantize_in_graph(model)
    if train.fused_lora or train.dropout_kernel:
        set_lora_forward(model, fused_update=train.fused_lora, dropout_kernel=train.dropout_kernel)
    if train.compile:
        compile_layers(model, in_graph=train.recompute_in_graph, save_matmuls=train.save_matmuls)
    return model


class RecomputeInGraph:
    """Mixed into a decoder layer's class by `compile_layers`: the layer checkpoints its own forward (when
    `recompute`, training and grad are on), so the checkpoint lies inside the compiled graph. There the
    partitioner recomputes, inside the compiled backward, only what backward reads: never the output of the
    down and output projections' base matmuls (~35% of a layer's forward FLOPs), which transformers'
    checkpoint around the whole call runs again."""

    recompute = False

    def forward(self, *args, **kwargs):
        forward = super().forward
        if self.recompute and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


_recomputing_classes: dict[type, type] = {}


def recompute_in_graph(layer) -> None:
    """Move `layer`'s gradient checkpointing from transformers into the layer's own forward (see
    RecomputeInGraph). One shared class per layer class, so regional compilation still traces one graph."""
    cls = type(layer)
    if issubclass(cls, RecomputeInGraph):
        return
    if cls not in _recomputing_classes:
        _recomputing_classes[cls] = type(f"RecomputeInGraph{cls.__name__}", (RecomputeInGraph, cls), {})
    checkpointed = bool(getattr(layer, "gradient_checkpointing", False))
    layer.__class__ = _recomputing_classes[cls]
    layer.gradient_checkpointing, layer.recompute = False, checkpointed


class CheckpointedMatmulTags:
    """Inductor joint-graph pass that decides what a checkpointed layer does with its 4-bit matmuls'
    outputs: recompute them in backward (`save=False`) or keep them (`save=True`: q, k, v, gate and up
    outputs, ~0.7 GB a layer at 8 x 1024 for A.X 4.0 Light, which spares most of the recompute). Needed
    because bitsandbytes' matmul comes out of its autograd.Function without the checkpoint's tag on
    PyTorch 2.11, and the partitioner then saves it: +17 GiB at 8 x 1024. The fused LoRA-dropout op's
    output (train.dropout_kernel) is always kept: r values a token, where its recompute reads the whole
    input again. With train.dequant_in_graph the 4-bit matmuls are plain matmuls reading weights that
    `engine.perf.nf4`'s op dequantizes: those matmuls get the same choice, and the dequantizing nodes are always
    recomputed, never saved (inside a checkpoint or not), so backward dequantizes each weight once for its
    recompute and its input gradient together. Shaped as inductor's CustomGraphPass (a call on the graph,
    a uuid), not derived from it: the contest's PyTorch 2.1 has no such class."""

    def __init__(self, save: bool):
        self.save = save

    def __call__(self, graph) -> None:
        from torch.utils.checkpoint import CheckpointPolicy
        from engine.perf.nf4 import dequantized_weights

        matmul_policy = CheckpointPolicy.MUST_SAVE if self.save else CheckpointPolicy.PREFER_RECOMPUTE
        dequantizing, readers = dequantized_weights(graph)
        for node in dequantizing:
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
        readers = set(readers)
        for node in graph.nodes:
            target = str(node.target) if node.op == "call_function" else ""
            if target.startswith("bitsandbytes.gemm_4bit") or node in readers:
                policy = matmul_policy
            elif target.startswith("fsku.lora_a_dropout."):
                policy = CheckpointPolicy.MUST_SAVE
            else:
                continue
            region = next((a.meta["ac_graph_id"] for a in [node, *node.all_input_nodes] if "ac_graph_id" in a.meta),
                          None)
            if region is not None:  # inside a checkpoint
                node.meta["ac_graph_id"], node.meta["recompute"] = region, policy

    def uuid(self) -> str:  # the key of inductor's graph cache
        return f"fsku-checkpointed-matmul-tags-v3-save={self.save}"

    def __eq__(self, other) -> bool:  # torch.compile compares backends' options to share graphs
        return isinstance(other, CheckpointedMatmulTags) and other.save == self.save

    def __hash__(self) -> int:
        return hash(self.uuid())


def compile_layers(model, backend="inductor", in_graph: bool = True, save_matmuls: int = 0) -> None:
    """torch.compile each decoder layer (regional compilation: one graph shared by identical layers, with
    dynamic shapes so varying sequence lengths do not recompile). It removes most of the host overhead
    of the 4-bit + LoRA layers; the first step pays the compile time (~1.5 min for A.X 4.0 Light).
    `in_graph` (train.recompute_in_graph) puts each checkpointed layer's recompute inside its compiled
    graph; there the first `save_matmuls` layers (train.save_matmuls) keep their 4-bit matmul outputs
    (CheckpointedMatmulTags). Layers compiled with other inductor options get graphs of their own, so
    saving and recomputing layers cost one more compile, not one a layer."""

    layers = causal_lm(model).get_decoder().layers
    if save_matmuls > len(layers):
        raise UserError(f"train.save_matmuls: {save_matmuls} is more than the model's {len(layers)} layers")
    for i, layer in enumerate(layers):
        options = None
        if in_graph and backend == "inductor":
            # With the checkpoint in the graph, inductor's own random kernels leave seed nodes that PyTorch
            # 2.11's partitioner cannot place ("Node ... was invalid, but is output", A.X shape, CUDA);
            # PyTorch's random kernels avoid that, draw what eager draws, and cost no measurable time.
            options = {"fallback_random": True, "joint_custom_pre_pass": CheckpointedMatmulTags(i < save_matmuls)}
        if in_graph:
            recompute_in_graph(layer)
        layer.compile(dynamic=True, backend=backend, options=options)
