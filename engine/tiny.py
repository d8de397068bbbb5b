"""The tiny offline model for the demo and the tests: a few-layer Qwen2 and a byte-level BPE tokenizer
trained on the project's own sample data, with A.X 4.0 Light's special tokens at the same ids
(`<|pad|>` = 1, `<|im_start|>` = 25, `<|im_end|>` = 27), so prompts and labels look exactly alike.

Two sizes: `demo` (3 layers of 128, 8 heads), which learns the sample questions within the demo's minute of
training, and `test` (2 layers of 64), which the test suite builds because CI runs it hundreds of times.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from engine.files import atomic_write_dir

SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|pad|>", "<|unk|>", "<|sep|>", "<|mask|>", "<|cls|>", "<|image|>", "<|audio|>",
     "<|user|>", "<|system|>", "<|assistant|>"]
    + [f"<|extra_id_{i}|>" for i in range(11)]
    + ["</think>", "<think>", "<|extra_id_13|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"]
)


@dataclass(frozen=True)
class TinySize:
    shape: dict
    """Qwen2Config's size fields."""
    pretrain_steps: int


SIZES = {
    "demo": TinySize(dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
                          num_key_value_heads=4), pretrain_steps=300),
    "test": TinySize(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2), pretrain_steps=150),
}
VOCAB_SIZE = 1024
DOC_TOKENS = 128


def train_tokenizer(texts: Iterable[str]):
    """A byte-level BPE tokenizer (a few hundred ms on the sample data), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")


def pretraining_docs(texts: list[str]) -> list[str]:
    """The texts as plain documents, and each again as a chat turn whose answer echoes its first line.

    The echo turns are what a chat model brings to fine-tuning and a model pretrained on documents lacks: an
    answer that depends on the question (without them the answer position of a chat prompt reads almost
    nothing of the question: its hidden state is the same for every question to cosine 0.99, and LoRA does
    not learn a lookup from it in the demo's minutes), and `<|im_end|>` as a trained token (never seen, its
    output row ends like every other unseen token's and its probability stops at 7%, so no answer ends)."""
    echo = [f"<|im_start|><|user|>{t}<|im_end|><|im_start|><|assistant|>{t.splitlines()[0][:60]}<|im_end|>"
            for t in texts]
    return list(texts) + echo


def pretrain(model, tokenizer, docs: list[str], steps: int, batch: int = 8) -> None:
    """A few seconds of plain language modelling on the documents (each cut to its first DOC_TOKENS), so
    the demo starts from a model that has seen Korean rather than from noise, which LoRA alone cannot move."""
    import torch

    docs = [tokenizer.encode(t)[:DOC_TOKENS] for t in docs]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(docs), (batch,), generator=gen).tolist()
        width = max(len(docs[i]) for i in pick)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        labels = torch.full((batch, width), -100)
        for row, i in enumerate(pick):
            ids[row, : len(docs[i])] = torch.tensor(docs[i])
            labels[row, : len(docs[i])] = torch.tensor(docs[i])
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_tiny_model(out_dir: str | Path, texts: list[str], size: str = "demo", seed: int = 0,
                     extra_files: Optional[dict[str, str]] = None) -> Path:
    """Write a tiny Qwen2 model of `size` (a key of SIZES), pretrained on `texts`, its tokenizer and
    `extra_files` (name -> text) to `out_dir` (atomically: all or nothing)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts)
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=27, pad_token_id=1, rope_theta=10000.0, **SIZES[size].shape)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    pretrain(model, tokenizer, pretraining_docs(texts), SIZES[size].pretrain_steps)
    def fill(d: Path) -> None:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        for name, text in (extra_files or {}).items():
            (d / name).write_text(text, encoding="utf-8")

    atomic_write_dir(out_dir, fill, replace=False)  # another process built it meanwhile: keep theirs
    return out_dir
