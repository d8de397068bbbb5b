"""Packed steps compute the same loss as one padded row per example, and no example sees another."""
import pytest
import torch

from conftest import SAMPLE, TINY_RECIPE, events, run_cli, tiny_overrides
from decode.forward import hidden_states
from engine.batch import collate
from engine.batch import slot_count
from engine.config import LoraConfig, ModelConfig, TrainConfig
from engine.data import Encoded, encode_all, read_examples
from engine.loss import forward_backward
from engine.model import add_lora, load_base_model
from engine.perf.packing import (first_fit_decreasing, largest_forward, pack_rows, packed_layout, row_lengths_for,
                                 step_batches)


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    model = add_lora(load_base_model(ModelConfig(path=str(tiny_model), quant="none")),
                     LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():  # non-zero B so LoRA changes the output and gets gradients
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    examples = read_examples(SAMPLE)
    mc = [e for e in examples if e.kind == "mc"][:9]
    subj = [e for e in examples if e.kind == "subj"][:3]
    return model, encode_all(tiny_tokenizer, mc + subj, "s", 512), tiny_tokenizer.pad_token_id


def loss_and_grads(model, batches, weighting):
    model.zero_grad()
    loss = float(forward_backward(model, batches, weighting))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_row_lengths_hold_the_longest_example_up_to_the_forward_budget():
    assert row_lengths_for(1, 200) == [64, 96, 128, 192]
    assert row_lengths_for(200, 1024) == [256, 384, 512, 768, 1024]
    assert row_lengths_for(700, 512) == [768]  # one row however small the budget


def test_a_step_takes_the_row_length_that_pads_it_least():
    # 192 takes three rows (576 tokens), 256 two (512), 384 two (768), 512 one (512, longer rows: attention)
    width, rows = packed_layout([150, 150, 40, 40, 40, 40], 2048)
    assert (width, rows) == (256, [[0, 2, 3], [1, 4, 5]])
    # a mix of short MC rows and a few long subjective ones: 2,018 tokens; two micro-batches of 8 padded to
    # their longest take 5,600
    mix = [60, 80, 70, 300, 90, 65, 75, 85, 250, 70, 60, 95, 80, 66, 72, 400]
    width, rows = packed_layout(mix, 8 * 1024)
    assert width * len(rows) <= 2304
    width, rows = packed_layout([500, 20, 20], 2048)
    assert (width, rows) == (768, [[0, 1, 2]])


def test_first_fit_decreasing_keeps_every_example_once_within_capacity():
    lengths = [90, 10, 60, 40, 33, 31, 100, 5]
    rows = first_fit_decreasing(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert rows == [[6], [0, 1], [2, 3], [4, 5, 7]]


@pytest.mark.parametrize("weighting", ["token", "example"])
@pytest.mark.parametrize("tokens_per_forward", [10 ** 6, 600])
def test_packed_step_has_the_padded_steps_loss_and_lora_gradients(setup, weighting, tokens_per_forward):
    model, enc, pad = setup
    packed = step_batches(enc, pad, TrainConfig(packing=True, micro_batch=1), tokens_per_forward, torch.float32)
    assert sum(b.n_examples for b in packed) == len(enc)
    assert sum(b.n_tokens for b in packed) == sum(len(e.input_ids) for e in enc)
    if tokens_per_forward == 600:
        assert len(packed) > 1
    padded = step_batches(enc, pad, TrainConfig(packing=False, micro_batch=4), 512, torch.float32)
    want_loss, want_grads = loss_and_grads(model, padded, weighting)
    got_loss, got_grads = loss_and_grads(model, packed, weighting)
    assert abs(got_loss - want_loss) < 1e-5
    assert want_grads and all(float(g.abs().max()) > 0 for g in want_grads.values())
    for name, g in got_grads.items():
        assert torch.allclose(g, want_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("packing", [True, False])
def test_largest_forward_is_what_the_built_batches_hold(setup, packing):
    """The plan sizes memory from the layout without building a batch: it must match the batches built."""
    _, enc, pad = setup
    train = TrainConfig(packing=packing, micro_batch=2)
    steps = [[0, 1, 2, 3], [4, 5, 6, 7], [2, 5, 7, 1, 0]]
    lengths, answers = [len(e.input_ids) for e in enc], [e.n_answer_tokens for e in enc]
    built = [b for step in steps for b in step_batches([enc[i] for i in step], pad, train, 300, torch.float32)]
    tokens, slots = largest_forward(steps, lengths, answers, train, 300)
    assert tokens == max(b.input_ids.numel() for b in built)
    assert slots == max(len(b.answer_targets) for b in built) == slot_count(max(b.n_answer_tokens for b in built))


def logits_by_example(model, batch):
    with torch.no_grad():
        h = hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids)
        logits = model.get_output_embeddings()(h)
    return [logits[batch.example_ids == k] for k in range(batch.n_examples)]


def test_no_attention_crosses_examples(setup, tiny_tokenizer):
    model, enc, pad = setup
    items = enc[:6]
    rows = first_fit_decreasing([len(e.input_ids) for e in items], 512)
    assert any(len(r) > 1 for r in rows)
    before = logits_by_example(model, pack_rows(items, rows, 512, pad, torch.float32))
    # each example alone in its own unpadded row gives the same logits
    for k, i in enumerate(i for r in rows for i in r):
        alone = logits_by_example(model, collate([items[i]], pad))[0]
        assert torch.allclose(before[k], alone, atol=1e-5), i
    # change one example's tokens (same length): every other example's logits stay as they were
    changed = list(items)
    victim = rows[0][0]
    other = torch.randint(100, len(tiny_tokenizer), (len(items[victim].input_ids),)).tolist()
    changed[victim] = Encoded(other, items[victim].labels, items[victim].example)
    after = logits_by_example(model, pack_rows(changed, rows, 512, pad, torch.float32))
    order = [i for r in rows for i in r]
    for k, i in enumerate(order):
        if i == victim:
            assert not torch.allclose(after[k], before[k], atol=1e-3)
        else:
            assert torch.equal(after[k], before[k]), i


def test_first_label_of_each_packed_example_is_never_predicted_by_its_neighbour(setup):
    _, enc, pad = setup
    batch = pack_rows(enc, [list(range(len(enc)))], 4096, pad, torch.float32)
    starts = (batch.position_ids == 0) & (batch.example_ids >= 0)
    assert int(starts.sum()) == len(enc)
    assert bool((batch.labels[starts] == -100).all())
    assert batch.n_answer_tokens == sum(e.n_answer_tokens for e in enc)


def test_train_py_logs_the_same_losses_packed_and_padded(tiny_model, tmp_path):
    losses = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        r = run_cli("train.py", TINY_RECIPE, *tiny_overrides(
            tiny_model, out, f"train.packing={packing}", "lora.dropout=0", "train.max_steps=6", "eval.every_steps=0",
            "checkpoint.at_steps=[]"))
        assert r.returncode == 0, r.stderr[-2000:]
        losses[packing] = [e["loss"] for e in events(out, "train")]
    assert len(losses["true"]) == 6
    assert max(abs(a - b) for a, b in zip(losses["true"], losses["false"])) < 1e-4
