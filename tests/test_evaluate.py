"""The in-loop eval's teacher-forced pass: its loss and the MC answers it reads off must be what the
separate passes (eval_loss over the answer tokens, masked MC scoring of the prompt) give."""
from dataclasses import replace

import pytest
import torch

from conftest import SAMPLE
from decode.batching import left_pad
from decode.forward import last_token_logits
from engine.config import ModelConfig, Recipe
from engine.data import read_examples
from engine.evaluate import Evaluator, eager, teacher_forced
from engine.batch import collate
from engine.loss import answer_token_losses, forward_backward
from engine.model import load_base_model


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    model = load_base_model(ModelConfig(path=str(tiny_model), quant="none")).eval()
    recipe = Recipe()
    recipe.decode.batch_size = 7  # several batches, uneven last one
    examples = read_examples(SAMPLE)
    ev = Evaluator(tiny_tokenizer, examples, recipe, None)
    with torch.no_grad():  # digit rows that read what differs between the questions: answers that differ
        mc = [p for p, e in zip(ev.prompts, examples) if e.kind == "mc"]
        ids, mask = left_pad(mc, tiny_tokenizer.pad_token_id, "cpu")
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][:, -1]
        mean = h.mean(0)
        rows = torch.linalg.svd(h - mean, full_matrices=False)[2][: len(ev.digit_ids)]
        shared = torch.nn.functional.normalize(mean, dim=0)
        rows -= (rows @ shared)[:, None] * shared  # the hidden state all questions share adds nothing
        model.get_output_embeddings().weight[ev.digit_ids] = 100 * rows
    return model, ev


def test_teacher_forced_loss_is_the_mean_answer_token_loss(setup, tiny_tokenizer):
    model, ev = setup
    with torch.no_grad():
        batch = collate(ev.encoded, tiny_tokenizer.pad_token_id)
        ce = answer_token_losses(model, batch)[0][:batch.n_answer_tokens]
    for chunk in (4096, 3):  # chunking the head changes nothing
        tf = teacher_forced(model, ev.encoded, 7, tiny_tokenizer.pad_token_id, ev.digit_ids, chunk)
        assert tf.loss == pytest.approx(float(ce.mean()), rel=1e-5)


def test_mc_answers_from_the_teacher_forced_pass_equal_masked_scoring(setup, tiny_tokenizer):
    model, ev = setup
    tf = teacher_forced(model, ev.encoded, 7, tiny_tokenizer.pad_token_id, ev.digit_ids)
    known = ev.mc_from_teacher_forced(tf)
    mc_rows = [i for i, e in enumerate(ev.examples) if e.kind == "mc"]
    assert sorted(known) == mc_rows and len(mc_rows) == 64
    with torch.no_grad():
        ids, mask = left_pad([ev.prompts[i] for i in mc_rows], tiny_tokenizer.pad_token_id, "cpu")
        logits = last_token_logits(model, ids, mask)
    assert torch.allclose(tf.digit_logits[mc_rows], logits[:, ev.digit_ids], atol=1e-4)
    separate = ev.decode(model).predictions
    merged = ev.decode(model, known).predictions
    assert [(p.id, p.text, p.raw) for p in merged] == [(p.id, p.text, p.raw) for p in separate]
    assert len({p.text for i, p in enumerate(merged) if i in known}) > 1  # not one constant answer


def test_rows_cut_by_max_len_and_permuted_scoring_fall_back_to_their_own_pass(tiny_tokenizer, setup):
    model, _ = setup
    recipe = Recipe()
    longest = max(len(p) for p in setup[1].prompts)
    recipe.data.max_len = longest  # the longest MC prompt loses 2 tokens to its answer in the encoded row
    ev = Evaluator(tiny_tokenizer, read_examples(SAMPLE), recipe, None)
    tf = teacher_forced(model, ev.encoded, 8, tiny_tokenizer.pad_token_id, ev.digit_ids)
    cut = [i for i, p in enumerate(ev.prompts) if len(p) == longest and ev.examples[i].kind == "mc"]
    assert cut and not set(cut) & set(ev.mc_from_teacher_forced(tf))
    ev.recipe = replace(recipe, decode=replace(recipe.decode, mc_permutations=2))
    assert ev.mc_from_teacher_forced(tf) == {}


def test_eval_runs_compiled_layers_eagerly(tiny_model, tiny_tokenizer):
    """With train.compile, eval's no-grad forwards and generation steps compile no new graphs."""
    import torch._dynamo as dynamo

    from engine.config import LoraConfig
    from engine.model import add_lora
    from engine.perf.levers import compile_layers

    torch.manual_seed(0)
    model = add_lora(load_base_model(ModelConfig(path=str(tiny_model), quant="none")), LoraConfig(r=4), True)
    compile_layers(model)
    recipe = Recipe()
    recipe.eval.generate = False
    ev = Evaluator(tiny_tokenizer, read_examples(SAMPLE)[:12], recipe, None)
    model.train()
    forward_backward(model, [collate(ev.encoded[:4], tiny_tokenizer.pad_token_id)], "token")
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    event = ev(model, 1)
    assert model.training and event["eval_loss"] > 0
    ev.recipe.eval.generate = True
    with eager():
        _, decoded = ev.loss_and_answers(model.eval())
    assert len(decoded.predictions) == 12
    assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_eval_with_lora_merged_on_the_fly_equals_peft(tiny_model, tiny_tokenizer):
    """eval.merge_lora: the same logits, eval_loss and answers as peft's LoRA layers; on exit every layer's
    forward is what it was (peft's, or the training levers')."""
    from engine.config import LoraConfig
    from engine.lora import lora_linears, lora_merged_on_the_fly
    from engine.perf.lora_forward import set_lora_forward, training_forward
    from engine.model import add_lora

    torch.manual_seed(0)
    model = add_lora(load_base_model(ModelConfig(path=str(tiny_model), quant="none")),
                     LoraConfig(r=4, alpha=8, dropout=0.1), False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.eval()
    set_lora_forward(lora_linears(model)[0], fused_update=True)  # one layer with a training lever's forward
    ids = torch.tensor([tiny_tokenizer("1 파일 암호화 2 접근 통제")["input_ids"]])
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
    with lora_merged_on_the_fly(model):
        assert not torch.is_grad_enabled()
        merged_logits = model(input_ids=ids).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        assert (peft_logits - model(input_ids=ids).logits).abs().max() > 1e-3  # the adapters count
    forwards = [m.__dict__.get("forward") for m in lora_linears(model)]
    assert forwards[0].__func__ is training_forward and forwards[1:] == [None] * (len(forwards) - 1)

    recipe = Recipe()
    results = []
    for merge in (False, True):
        recipe.eval.merge_lora = merge
        ev = Evaluator(tiny_tokenizer, read_examples(SAMPLE), recipe, None)
        loss, decoded = ev.loss_and_answers(model)
        results.append((loss, [(p.id, p.text) for p in decoded.predictions]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[0][1] == results[1][1]
