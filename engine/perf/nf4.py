"""train.dequant_in_graph: 4-bit NF4 weights dequantized inside the compiled layers, then a plain matmul.

bitsandbytes' 4-bit linear reaches a compiled graph as one opaque op (`bitsandbytes::gemm_4bit`) whose
kernel is Python: ~0.1 ms of host time a call, ~330 calls a step for A.X 4.0 Light, in a step that is
host-bound at small batches. The op `fsku::dequantize_nf4` (a `triton_op`) is seen into by torch.compile:
on CUDA its Triton kernel (`engine.nf4_triton`) becomes a node of the graph that inductor launches from its
generated code, and the partitioner sees the weight it produces, so a checkpointed layer's recompute and its
backward read one dequantized weight, where bitsandbytes dequantizes for each. On the CPU the op runs
`dequantize_nf4`'s PyTorch ops.

The same weights bit for bit: each byte holds two 4-bit indices into the 16 NF4 values (high nibble first),
each block of `blocksize` values is scaled by its fp32 block scale in fp32, and the product is rounded
to the compute dtype, as bitsandbytes' kernels do.
"""
import operator
import types

import torch

from engine.errors import UserError
from engine.lora import is_4bit

_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size,
                   blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight bitsandbytes' `dequantize_4bit` returns for `packed` (uint8, two values a byte) with fp32
    block scales `absmax` and the 16-value `code`."""
    flat = packed.reshape(-1)
    indices = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1, blocksize).long()
    return (code[indices] * absmax.reshape(-1, 1)).to(dtype).reshape(shape)


@torch.library.triton_op("fsku::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, rows: int,
                      cols: int, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_nf4` of a rows x cols weight: on CUDA through the Triton kernel."""
    if packed.is_cuda:
        from engine.perf.nf4_triton import dequantize
        return dequantize(packed, absmax, code, blocksize, rows, cols, dtype)
    return dequantize_nf4(packed, absmax, code, torch.Size((rows, cols)), blocksize, dtype)


def nf4_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward with the weight dequantized by `dequantize_nf4_op`."""
    state = self.weight.quant_state
    dtype = self.compute_dtype or x.dtype
    weight = dequantize_nf4_op(self.weight, state.absmax, state.code, state.blocksize, *state.shape, dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def dequantize_in_graph(model) -> int:
    """Give every 4-bit linear of `model` `nf4_linear_forward`; returns how many. Its block scales must be
    fp32 already (train.expand_double_quant): the double-quant step in PyTorch ops would round differently."""

    changed = 0
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and is_4bit(module.weight)):
            continue
        state = module.weight.quant_state
        if state.quant_type != "nf4" or state.nested or state.absmax.dtype != torch.float32:
            raise UserError(f"train.dequant_in_graph: {name} is not NF4 with fp32 block scales "
                            "(set train.expand_double_quant: true)")
        if state.shape.numel() % state.blocksize:
            raise UserError(f"train.dequant_in_graph: {name}'s {tuple(state.shape)} weight is not whole blocks of "
                            f"{state.blocksize}")
        module.forward = types.MethodType(nf4_linear_forward, module)
        changed += 1
    return changed


def _role(node) -> str:
    """'matmul', 'op' (computes from its inputs alone: PyTorch ops, getitem, the traced Triton kernel) or ''
    (anything else: placeholders, opaque custom ops such as bitsandbytes')."""
    target = node.target
    if node.op != "call_function":
        return ""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace not in ("aten", "prims"):
            return ""
        return "matmul" if target.overloadpacket.__name__ in _MATMULS else "op"
    return "op" if target is operator.getitem or isinstance(target, torch._ops.HigherOrderOperator) else ""


def dequantized_weights(graph) -> tuple[list, list]:
    """In an aten graph: the nodes that compute weights from 4-bit bytes (`dequantize_nf4_op` as traced:
    computed from placeholders alone, one of them uint8), and the matmuls that read those weights."""
    from_inputs, from_bytes, nodes, readers = set(), set(), [], []
    for node in graph.nodes:
        if node.op == "placeholder":
            from_inputs.add(node)
            if getattr(node.meta.get("val"), "dtype", None) == torch.uint8:
                from_bytes.add(node)
            continue
        role = _role(node)
        reads_bytes = any(i in from_bytes for i in node.all_input_nodes)
        if role == "matmul" and reads_bytes:
            readers.append(node)
        elif role == "op" and all(i in from_inputs for i in node.all_input_nodes):
            from_inputs.add(node)  # also what takes no input (the kernel's empty output)
            if reads_bytes:
                from_bytes.add(node)
                nodes.append(node)
    return nodes, readers
