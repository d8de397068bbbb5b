"""The tiny offline model for the demo and the tests: a few-layer Qwen2 and a byte-level BPE tokenizer
trained on the project's own sample data, with A.X 4.0 Light's special tokens at the same ids
(`<|pad|>` = 1, `<|im_start|>` = 25, `<|im_end|>` = 27), so prompts and labels look exactly alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from engine.files import atomic_write_dir

SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|pad|>", "<|unk|>", "<|sep|>", "<|mask|>", "<|cls|>", "<|image|>", "<|audio|>",
     "<|user|>", "<|system|>", "<|assistant|>"]
    + [f"<|extra_id_{i}|>" for i in range(11)]
    + ["</think>", "<think>", "<|extra_id_13|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"]
)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
VOCAB_SIZE = 1024
PRETRAIN_STEPS = 150


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


def pretrain(model, tokenizer, texts: list[str], steps: int = PRETRAIN_STEPS, batch: int = 8) -> None:
    """A few seconds of plain language modelling on the texts, so the demo starts from a model that has
    seen Korean rather than from noise, which LoRA alone cannot move. The texts are documents, not chat
    turns: the answer format is left for fine-tuning to learn."""
    import torch

    docs = [tokenizer.encode(t)[:128] for t in texts]
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


def build_tiny_model(out_dir: str | Path, texts: list[str], seed: int = 0, extra_files: Optional[dict[str, str]] = None
                     ) -> Path:
    """Write a tiny random Qwen2 model, its tokenizer and `extra_files` (name -> text) to `out_dir`
    (atomically: all or nothing)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts)
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=27, pad_token_id=1, rope_theta=10000.0, **TINY_SHAPE)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    pretrain(model, tokenizer, texts)
    def fill(d: Path) -> None:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        for name, text in (extra_files or {}).items():
            (d / name).write_text(text, encoding="utf-8")

    atomic_write_dir(out_dir, fill, replace=False)  # another process built it meanwhile: keep theirs
    return out_dir
