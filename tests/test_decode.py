import collections

import pytest
import torch

from conftest import SAMPLE
from decode.digits import digit_token_ids
from decode.mc import answer_mc
from engine.options import rotated
from decode.subjective import answer_subjective
from engine.config import ModelConfig
from engine.data import Example, encode_prompt, read_examples
from engine.errors import UserError
from engine.model import load_base_model
from metrics.text import sentences, trim_sentences


@pytest.fixture(scope="module")
def model(tiny_model):
    torch.manual_seed(0)
    return load_base_model(ModelConfig(path=str(tiny_model), quant="none")).eval()


def test_real_tokenizer_digits_are_57_to_61_after_the_answer_prefix(ax_tokenizer, fsku_dev):
    ex = read_examples(fsku_dev)[0]
    prompt = encode_prompt(ax_tokenizer, ex, "당신은 금융보안 전문가입니다.")
    assert digit_token_ids(ax_tokenizer, prompt)[:5] == [57, 58, 59, 60, 61]


class SplittingTokenizer:
    """A tokenizer that merges a digit into the prompt's last token: must be refused."""
    def decode(self, ids, skip_special_tokens=False):
        return "x"

    def encode(self, text, add_special_tokens=False):
        return [1] if len(text) == 1 else [7]


def test_a_tokenizer_that_merges_digits_is_an_error():
    with pytest.raises(UserError, match="digit 1 is not one token after the answer prefix"):
        digit_token_ids(SplittingTokenizer(), [5])


def test_rotate_options():
    q = "질문?\n1 가\n2 나\n3 다\n4 라"
    assert rotated(q, 1) == "질문?\n1 나\n2 다\n3 라\n4 가"
    assert rotated(q, 0) == q
    # every style keeps its own markers and spacing; only the texts move
    assert rotated("질문?\n ① 가\n ② 나\n ③ 다", 2) == "질문?\n ① 다\n ② 가\n ③ 나"
    assert rotated("질문?\n(1) 가\n(2) 나", 1) == "질문?\n(1) 나\n(2) 가"
    assert rotated("질문?\n1. 가\n2. 나\n뒤 문장", 1) == "질문?\n1. 나\n2. 가\n뒤 문장"


def test_mc_answers_are_always_allowed_digits(model, tiny_tokenizer):
    examples = [e for e in read_examples(SAMPLE) if e.kind == "mc"]
    prompts = [encode_prompt(tiny_tokenizer, e, "s") for e in examples]
    digits = digit_token_ids(tiny_tokenizer, prompts[0])
    got = answer_mc(model, tiny_tokenizer, examples, lambda e: encode_prompt(tiny_tokenizer, e, "s"), digits, 8)
    assert len(got) == len(examples)
    for e, a in zip(examples, got):
        assert a.choice in {str(d) for d in range(1, e.n_options + 1)}
        assert isinstance(a.raw, str) and a.raw
    # batching and padding do not change the answer
    one = answer_mc(model, tiny_tokenizer, examples[:5], lambda e: encode_prompt(tiny_tokenizer, e, "s"), digits, 1)
    assert [a.choice for a in one] == [a.choice for a in got[:5]]


def test_mc_mask_follows_the_option_count(model, tiny_tokenizer):
    """Whatever the model prefers, a 4-option question never gets 5..9."""
    e4 = Example("x", "질문?\n1 가\n2 나\n3 다\n4 라", None, "mc", 4)
    prompts = [encode_prompt(tiny_tokenizer, e4, "s")]
    digits = digit_token_ids(tiny_tokenizer, prompts[0])
    head = model.get_output_embeddings()
    with torch.no_grad():  # make "7" overwhelming: its logit at the answer position 100 higher
        h = model(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states[-1][0, -1]
        bump = 100.0 * h / h.square().sum()
        head.weight[digits[6]] += bump
    try:
        a = answer_mc(model, tiny_tokenizer, [e4], lambda e: encode_prompt(tiny_tokenizer, e, "s"), digits, 1)[0]
        assert a.raw == "7" and a.choice in {"1", "2", "3", "4"}
    finally:
        with torch.no_grad():
            head.weight[digits[6]] -= bump


def test_permuted_scoring_returns_original_option_numbers(model, tiny_tokenizer):
    examples = [e for e in read_examples(SAMPLE) if e.kind == "mc"][:6]
    enc = lambda e: encode_prompt(tiny_tokenizer, e, "s")  # noqa: E731
    digits = digit_token_ids(tiny_tokenizer, enc(examples[0]))
    got = answer_mc(model, tiny_tokenizer, examples, enc, digits, 4, permutations=4)
    assert all(1 <= int(a.choice) <= e.n_options for e, a in zip(examples, got))


def test_subjective_generation_is_capped_and_trimmed(model, tiny_tokenizer):
    examples = [e for e in read_examples(SAMPLE) if e.kind == "subj"][:4]
    prompts = [encode_prompt(tiny_tokenizer, e, "s") for e in examples]
    got = answer_subjective(model, tiny_tokenizer, prompts, max_new_tokens=12, no_repeat_ngram_size=3,
                            temperature=0.0, max_sentences=2, max_chars=300, batch_size=2,
                            fallbacks=["대체"] * 4)
    for a in got:
        assert a.text.strip() and a.n_tokens <= 12 and len(sentences(a.text)) <= 2
    again = answer_subjective(model, tiny_tokenizer, prompts, max_new_tokens=12, no_repeat_ngram_size=3,
                              temperature=0.0, max_sentences=2, max_chars=300, batch_size=2)
    assert [a.text for a in again] == [a.text if a.text != "대체" else "" for a in got]  # greedy: deterministic


def test_trim_sentences():
    assert trim_sentences("첫째다. 둘째다. 셋째다.", 2, 300) == "첫째다. 둘째다."
    assert trim_sentences("  한 문장  ", 2, 300) == "한 문장"
    assert len(trim_sentences("가" * 500, 2, 300)) == 300
    assert trim_sentences("짧다. " + "가" * 400, 2, 300) == "짧다."


def test_no_repeat_ngram_bans_exactly_the_repeating_tokens():
    from decode.subjective import no_repeat_ngram_processor
    ids = torch.tensor([[9, 9, 9, 5, 6, 7, 5, 6], [9, 9, 9, 1, 2, 3, 4, 5]])  # prompt of 3, then the answer
    scores = torch.zeros(2, 10)
    out = no_repeat_ngram_processor(3, 3)(ids, scores.clone())
    assert torch.isinf(out[0, 7]) and torch.isfinite(out[0]).sum() == 9  # "5 6" was followed by 7 before
    assert torch.isfinite(out[1]).all()  # "4 5" never occurred before
    # the prompt's n-grams are not banned: "9 9" -> 9 stands in the prompt only
    assert torch.isfinite(no_repeat_ngram_processor(3, 3)(torch.tensor([[9, 9, 9, 9, 9]]), torch.zeros(1, 10))[0, 8])


def test_generated_answers_repeat_no_trigram(model, tiny_tokenizer):
    examples = [e for e in read_examples(SAMPLE) if e.kind == "subj"][:6]
    prompts = [encode_prompt(tiny_tokenizer, e, "s") for e in examples]
    from decode.batching import left_pad
    from decode.subjective import no_repeat_ngram_processor
    from transformers import LogitsProcessorList
    ids, mask = left_pad(prompts, tiny_tokenizer.pad_token_id, "cpu")
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                         logits_processor=LogitsProcessorList([no_repeat_ngram_processor(3, ids.shape[1])]),
                         eos_token_id=-1, pad_token_id=tiny_tokenizer.pad_token_id)
    for row in gen[:, ids.shape[1]:].tolist():
        grams = [tuple(row[i:i + 3]) for i in range(len(row) - 2)]
        assert len(grams) == len(set(grams))


@pytest.mark.parametrize("with_lora", [False, True, "merged on the fly"])
def test_fast_greedy_generation_gives_the_tokens_of_hf_generate(model, tiny_model, tiny_tokenizer, with_lora):
    """Our KV-cache loop against HF generate: left-padded batch, end-of-turn, no-repeat rule, LoRA layers
    (peft's, and merged into the weights on the fly as the in-loop eval runs them)."""
    import contextlib

    from engine.config import LoraConfig
    from engine.lora import lora_merged_on_the_fly
    from engine.model import add_lora

    m = model
    if with_lora:
        m = add_lora(load_base_model(ModelConfig(path=str(tiny_model), quant="none")), LoraConfig(r=4), False)
        torch.manual_seed(3)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        m.eval()
    with lora_merged_on_the_fly(m) if with_lora == "merged on the fly" else contextlib.nullcontext():
        check_fast_generation(m, tiny_tokenizer)


def check_fast_generation(m, tiny_tokenizer):
    from decode.batching import left_pad
    from decode.fast_generate import greedy_generate, supports
    from decode.subjective import ban_repeats, hf_generate
    from engine.config import DataConfig

    assert supports(m)
    examples = read_examples(SAMPLE)
    prompts = [encode_prompt(tiny_tokenizer, e, DataConfig().system_prompt) for e in examples[::7]]
    assert len({len(p) for p in prompts}) > 3  # real left padding
    ids, mask = left_pad(prompts, tiny_tokenizer.pad_token_id, "cpu")
    pad = tiny_tokenizer.pad_token_id
    frequent = None
    for eos in (tiny_tokenizer.eos_token_id, "frequent"):
        # a token the model often says (but not in every row), taken as the end, makes some rows stop early
        eos = frequent if eos == "frequent" else eos
        for n in (0, 3):
            ours = greedy_generate(m, ids, mask, 12, eos, pad, lambda g, s: ban_repeats(g, s, n)).tolist()
            theirs = hf_generate(m, ids, mask, 12, n, 0.0, eos, pad)
            width = max(len(r) for r in theirs)
            assert [r + [pad] * (width - len(r)) for r in ours] == theirs
        in_rows = collections.Counter(t for r in theirs for t in set(r) if t != pad)
        frequent = max((t for t, n in in_rows.items() if n < len(theirs)), key=in_rows.get)  # not in every row
    assert any(eos in r[:-1] for r in theirs) and any(eos not in r for r in theirs)  # both ways of ending


def test_fast_generation_leaves_4bit_models_with_lora_branches_to_hf_generate(tiny_model):
    from decode.fast_generate import supports
    from engine.config import LoraConfig
    from engine.lora import lora_merged_on_the_fly
    from engine.model import add_lora
    m = add_lora(load_base_model(ModelConfig(path=str(tiny_model), quant="none")), LoraConfig(r=4), False).eval()
    assert supports(m)
    base = m.get_base_model().model.layers[0].mlp.up_proj.base_layer
    base.weight.quant_state = object()  # what bitsandbytes' Params4bit carries
    assert not supports(m)
    with lora_merged_on_the_fly(m):
        assert supports(m)
    with m.disable_adapter():
        assert supports(m)
