import pytest
import torch

from conftest import SAMPLE, compiled_checkpoint
from engine.config import LoraConfig, ModelConfig
from engine.data import encode_all, read_examples
from engine.batch import Batch, collate, slot_count
from engine.loss import answer_token_losses, forward_backward, weighted_loss_sum
from engine.model import add_lora, load_base_model


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    model = add_lora(load_base_model(ModelConfig(path=str(tiny_model), quant="none")),
                     LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():  # non-zero B so LoRA changes the output
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    examples = read_examples(SAMPLE)
    enc = encode_all(tiny_tokenizer, examples[:6] + [e for e in examples if e.kind == "subj"][:2], "s", 512)
    return model, enc, tiny_tokenizer.pad_token_id


def test_answer_only_head_equals_full_logits_loss(setup):
    model, enc, pad = setup
    batch = collate(enc, pad)
    ce, targets, rows = answer_token_losses(model, batch)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    n = batch.n_answer_tokens
    assert n == int((batch.labels[:, 1:] != -100).sum()) and ce.numel() == len(targets) == slot_count(n) >= n
    assert (targets[n:] == -100).all() and (ce[n:] == 0).all()  # padding slots weigh nothing
    assert abs(float(ce[:n].mean()) - float(full)) < 1e-5
    real = rows[:n].tolist()
    assert real == sorted(real) and set(real) == set(range(len(enc)))


def test_slot_counts_are_few_and_hold_every_answer():
    sizes = [slot_count(n) for n in range(0, 5000)]
    assert all(s >= n for n, s in enumerate(sizes)) and all(s <= max(64, 1.5 * n) for n, s in enumerate(sizes))
    assert sorted(set(sizes))[:6] == [64, 96, 128, 192, 256, 384]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("weighting", ["token", "example"])
def test_accumulated_micro_batches_equal_one_batch(setup, weighting):
    model, enc, pad = setup
    model.zero_grad()
    whole = collate(enc, pad)
    ce, targets, rows = answer_token_losses(model, whole)
    denom = whole.n_answer_tokens if weighting == "token" else len(enc)
    loss_whole = weighted_loss_sum(ce, targets, rows, len(enc), weighting) / denom
    loss_whole.backward()
    g_whole = grads(model)
    model.zero_grad()
    loss = forward_backward(model, [collate(enc[k:k + 3], pad) for k in range(0, len(enc), 3)], weighting)
    assert abs(float(loss) - float(loss_whole)) < 1e-5
    for name, g in grads(model).items():
        assert torch.allclose(g, g_whole[name], atol=1e-6), name


def test_chunked_head_is_the_same_loss_and_gradient(setup):
    """The chunked, checkpointed head/loss lever computes the same function (fp32, 1e-4)."""
    model, enc, pad = setup
    batch = collate(enc, pad)
    all_tokens = Batch(batch.input_ids, batch.attention_mask,
                       torch.where(batch.attention_mask.bool(), batch.input_ids, torch.tensor(-100)))
    results = []
    for chunk in (0, 7):
        model.zero_grad()
        loss = forward_backward(model, [all_tokens], "token", chunk)
        results.append((float(loss), grads(model)))
    assert abs(results[0][0] - results[1][0]) < 1e-4
    for name, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][name], atol=1e-5), name


def test_example_weighting_is_the_mean_of_example_means(setup):
    model, enc, pad = setup
    batch = collate(enc, pad)
    with torch.no_grad():
        ce, targets, rows = answer_token_losses(model, batch)
    n = batch.n_answer_tokens
    per_example = [float(ce[:n][rows[:n] == r].mean()) for r in range(len(enc))]
    got = float(weighted_loss_sum(ce, targets, rows, len(enc), "example")) / len(enc)
    assert abs(got - sum(per_example) / len(per_example)) < 1e-6
    # a 2-token MC answer and a long subjective one weigh the same; token weighting does not
    assert abs(float(ce[:n].mean()) - got) > 1e-4


def fresh_model(tiny_model, checkpointing: bool, dropout: float = 0.0):
    torch.manual_seed(0)
    model = add_lora(load_base_model(ModelConfig(path=str(tiny_model), quant="none")),
                     LoraConfig(r=4, alpha=8, dropout=dropout), gradient_checkpointing=checkpointing)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.train()
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = float(forward_backward(model, [batch], "token"))
    return loss, grads(model)


class HashedDropout(torch.nn.Module):
    """Dropout through PyTorch ops with train.dropout_kernel's draws (its LoRA linear's seed, drawn before
    each forward by engine.perf.lora_forward.attach_seeds, the kept elements hashed from it): what the
    kernel must compute."""

    def __init__(self, p: float, lora_linear):
        super().__init__()
        self.p, self.seed_of = p, lambda: lora_linear.dropout_seed

    def forward(self, x):
        from engine.perf.dropout_kernel import dropped, keep_mask
        flat = x.reshape(-1, x.shape[-1])
        return dropped(flat, keep_mask(self.seed_of(), *flat.shape, self.p), self.p).view(x.shape)


LEVER_KEYS = {"gradient_checkpointing": {"gradient_checkpointing": True},
              "keep_activations": {"gradient_checkpointing": True, "keep_activations": 1},
              "compile": {"compile": True}, "save_matmuls": {"compile": True, "save_matmuls": 1},
              "fused_lora": {"fused_lora": True}, "dropout_kernel": {"dropout_kernel": True}}


# no "compile" alone: compile+keep_activations compiles its last layer uncheckpointed, which is that path
@pytest.mark.parametrize("lever", ["gradient_checkpointing", "fused_lora", "fused_lora+dropout",
                                   "keep_activations+dropout", "compile+gradient_checkpointing+dropout",
                                   "compile+keep_activations+save_matmuls+dropout", "dropout_kernel+dropout",
                                   "fused_lora+dropout_kernel+dropout",
                                   "compile+gradient_checkpointing+dropout_kernel+dropout"])
def test_speed_levers_keep_the_same_loss(setup, tiny_model, lever):
    """Each combination of the train.* levers, applied through the perf entry the loop calls
    (engine.perf.speed.speed_up, train.speed off so exactly these keys), computes the plain path's loss and
    gradients (fp32, 1e-4); with train.dropout_kernel, against PyTorch ops dropping what its hash drops.
    Written against PyTorch 2.13 (inductor's fallback_random config, private)."""
    import torch._inductor.config
    from engine.config import Recipe, TrainConfig
    from engine.lora import lora_linears
    from engine.perf.lora_forward import training_forward
    from engine.perf.speed import speed_up
    _, enc, pad = setup
    batch = collate(enc, pad)
    dropout = 0.1 if "dropout" in lever else 0.0
    levers = set(lever.split("+")) - {"dropout"}
    keys = {"speed": "off", "gradient_checkpointing": False}
    for name in levers:
        keys.update(LEVER_KEYS[name])
    train = TrainConfig(**keys)
    plain_model = fresh_model(tiny_model, False, dropout)
    if train.dropout_kernel:
        from engine.perf.lora_forward import attach_seeds
        attach_seeds(plain_model, lora_linears(plain_model))
        for m in lora_linears(plain_model):
            m.lora_dropout["default"] = HashedDropout(dropout, m)
    torch.manual_seed(5)
    plain = loss_and_grads(plain_model, batch)
    model, plan = speed_up(fresh_model(tiny_model, train.gradient_checkpointing, dropout), Recipe(train=train),
                           torch.device("cpu"), largest_forward=lambda: (0, 0))
    assert plan.train == train
    if train.fused_lora or train.dropout_kernel:
        assert sum(m.forward.__func__ is training_forward for m in lora_linears(model)) == 2 * 7  # 2 layers x 7
    torch.manual_seed(5)  # the same dropout draws (compiled: through PyTorch's own random kernels)
    with torch._inductor.config.patch(fallback_random=True):
        fast = loss_and_grads(model, batch)
    assert abs(plain[0] - fast[0]) < 1e-4
    for name, g in plain[1].items():
        assert torch.allclose(g, fast[1][name], atol=1e-4), name


def mlp_forward_counts(model, batch) -> list[int]:
    """How often each decoder layer's MLP starts in one forward + backward (twice where recomputed; a
    pre-hook, since the recompute stops as soon as it has what backward needs, before the MLP returns)."""
    from decode.forward import causal_lm
    layers = causal_lm(model).get_decoder().layers
    counts = [0] * len(layers)
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, layer in enumerate(layers)]
    forward_backward(model, [batch], "token")
    for h in hooks:
        h.remove()
    return counts


def test_keep_activations_skips_the_recompute_of_the_last_layers(setup, tiny_model):
    from engine.perf.levers import keep_activations
    _, enc, pad = setup
    batch = collate(enc[:2], pad)
    model = fresh_model(tiny_model, True)
    assert mlp_forward_counts(model, batch) == [2, 2]
    keep_activations(model, 1)
    assert mlp_forward_counts(model, batch) == [2, 1]
    keep_activations(model, 2)
    assert mlp_forward_counts(model, batch) == [1, 1]


def matmuls_reading(graph, weight_shape) -> list[int]:
    """For each placeholder of an aten graph shaped `weight_shape`: how many matmuls read it, through views."""
    views = {"t", "view", "transpose", "permute", "_unsafe_view", "expand"}
    counts = []
    for weight in [n for n in graph.nodes if n.op == "placeholder"
                   and tuple(getattr(n.meta.get("val"), "shape", ())) == weight_shape]:
        count, frontier = 0, list(weight.users)
        while frontier:
            node = frontier.pop()
            name = getattr(node.target, "__name__", "").split(".")[0]
            if name in views:
                frontier.extend(node.users)
            elif name in ("mm", "addmm", "bmm"):
                count += 1
        counts.append(count)
    return counts


def test_compiled_recompute_skips_the_down_projection(setup, tiny_model):
    """train.recompute_in_graph: a checkpointed layer is recomputed inside its compiled backward, which
    runs again only what backward reads: the gate and up projections (their base weights feed a recompute
    and an input-gradient matmul there), not the down projection (its input gradient alone)."""
    from torch._dynamo.backends.common import aot_autograd
    from engine.perf.levers import compile_layers, keep_activations
    _, enc, pad = setup
    graphs = {}

    def keep(kind):
        def compiler(gm, _):
            graphs.setdefault(kind, gm.graph)
            return gm
        return compiler

    model = fresh_model(tiny_model, True, 0.1)
    compile_layers(model, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")))
    keep_activations(model, 0)  # after compiling: the layers' own switch, not transformers'
    loss_and_grads(model, collate(enc[:2], pad))
    mlp = model.base_model.model.model.layers[0].mlp
    gate, down = (tuple(p.base_layer.weight.shape) for p in (mlp.gate_proj, mlp.down_proj))
    assert matmuls_reading(graphs["forward"], gate) == [1, 1] and matmuls_reading(graphs["forward"], down) == [1]
    assert matmuls_reading(graphs["backward"], gate) == [2, 2]  # gate and up: recompute + input gradient
    assert matmuls_reading(graphs["backward"], down) == [1]


@pytest.mark.parametrize("save", [False, True])
def test_checkpointed_4bit_matmuls_are_recomputed_or_saved_as_asked(save):
    """CheckpointedMatmulTags, the joint-graph pass of train.recompute_in_graph: a bitsandbytes 4-bit
    matmul inside a checkpoint that lacks the checkpoint's tag (as on PyTorch 2.11) is recomputed in
    backward, or kept for it with train.save_matmuls; the gradient is the same either way."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes import matmul_4bit
    from engine.perf.levers import CheckpointedMatmulTags

    torch.manual_seed(0)
    weights = [bnbf.quantize_4bit(torch.randn(n, k), quant_type="nf4") for n, k in ((96, 64), (64, 96))]
    lora = torch.nn.Parameter(torch.randn(4, 64) * 0.1)

    def body(x):
        (w1, s1), (w2, s2) = weights
        h = matmul_4bit(x, w1.t(), quant_state=s1) + (x @ lora.t()).sum(-1, keepdim=True)
        return matmul_4bit(torch.nn.functional.silu(h), w2.t(), quant_state=s2) + x

    def untag(graph):  # as PyTorch 2.11 leaves them
        for node in graph.nodes:
            if str(node.target).startswith("bitsandbytes.gemm_4bit"):
                node.meta.pop("recompute", None)

    step, graphs = compiled_checkpoint(body, save, untag)
    x = torch.randn(8, 64)
    step(x).square().sum().backward()
    compiled_grad, lora.grad = lora.grad, None
    body(x).square().sum().backward()
    assert torch.allclose(compiled_grad, lora.grad, atol=1e-5)
    gemms = [n for n in graphs["backward"].nodes if str(n.target).startswith("bitsandbytes.gemm_4bit")]
    assert len(gemms) == (0 if save else 1)  # the first matmul's output feeds silu's backward
    assert CheckpointedMatmulTags(save) == CheckpointedMatmulTags(save) != CheckpointedMatmulTags(not save)


def test_checkpointed_dropout_kernel_output_is_kept_not_recomputed():
    """CheckpointedMatmulTags keeps the fused LoRA-dropout op's output (rank r wide) for backward: the
    backward graph runs only the op's backward, never its forward again; the gradient is unchanged."""
    from engine.perf.dropout_kernel import lora_a_with_dropout

    torch.manual_seed(0)
    lora_a = torch.nn.Parameter(torch.randn(4, 64) * 0.1)
    lora_b = torch.nn.Parameter(torch.randn(64, 4) * 0.1)

    seed = torch.tensor([7])

    def body(x):
        return torch.nn.functional.silu(x) + lora_a_with_dropout(x, lora_a, 0.2, seed) @ lora_b.t()

    step, graphs = compiled_checkpoint(body, save=False)
    x = torch.randn(8, 64, requires_grad=True)
    torch.manual_seed(1)
    step(x).square().sum().backward()
    compiled = [t.grad for t in (x, lora_a, lora_b)]
    x.grad = lora_a.grad = lora_b.grad = None
    torch.manual_seed(1)
    body(x).square().sum().backward()
    for got, want in zip(compiled, [x.grad, lora_a.grad, lora_b.grad]):
        assert torch.allclose(got, want, atol=1e-5)
    ops = [str(n.target) for n in graphs["backward"].nodes if str(n.target).startswith("fsku.")]
    assert ops == ["fsku.lora_a_dropout_backward.default"]
    # no random op in the layer (its seed comes in): nothing saves or restores the generator's state there,
    # which a CUDA graph could not capture
    for part in ("forward", "backward"):
        assert not [str(n.target) for n in graphs[part].nodes if "rng" in str(n.target) or "rand" in str(n.target)]


def test_save_matmuls_tags_the_first_layers_and_checks_the_count(tiny_model, monkeypatch):
    """train.save_matmuls=N: the first N layers compile with the pass that keeps their 4-bit matmul
    outputs, the others with the one that recomputes them; more than the model's layers is a user error."""
    from engine.errors import UserError
    from engine.perf.levers import CheckpointedMatmulTags, compile_layers
    model = fresh_model(tiny_model, True)
    given = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: given.append(kw["options"]))
    compile_layers(model, save_matmuls=1)
    assert [o["joint_custom_pre_pass"] for o in given] == [CheckpointedMatmulTags(True), CheckpointedMatmulTags(False)]
    assert all(o["fallback_random"] for o in given)
    with pytest.raises(UserError, match="train.save_matmuls: 3 is more than the model's 2 layers"):
        compile_layers(model, save_matmuls=3)


def test_keep_activations_beyond_the_layer_count_is_a_user_error(tiny_model):
    from engine.errors import UserError
    from engine.perf.levers import keep_activations
    with pytest.raises(UserError, match="train.keep_activations: 3 is more than the model's 2 layers"):
        keep_activations(fresh_model(tiny_model, True), 3)


def test_expanded_double_quant_dequantizes_to_the_same_weights():
    """train.expand_double_quant: fp32 block scales stored once; the 4-bit weight dequantizes bit for bit
    as before."""
    import bitsandbytes.functional as bnbf
    from engine.perf.levers import expand_double_quant

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 64, bias=False)
    packed, state = bnbf.quantize_4bit(layer.weight.data.to(torch.bfloat16), quant_type="nf4",
                                       compress_statistics=True)
    assert state.nested and state.absmax.dtype == torch.uint8
    layer.weight = torch.nn.Parameter(packed, requires_grad=False)
    layer.weight.quant_state = state
    before = bnbf.dequantize_4bit(packed, state).clone()
    assert expand_double_quant(layer) == 1
    assert not state.nested and state.absmax.dtype == torch.float32 and state.state2 is None
    assert torch.equal(bnbf.dequantize_4bit(packed, state), before)
    assert expand_double_quant(layer) == 0  # nothing left to expand
