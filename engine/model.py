"""Base model (4-bit NF4 on CUDA, plain weights on CPU) + LoRA through peft, and the tokenizer.

One loading path for training and inference. Kept to APIs that transformers 4.46 and PyTorch 2.1 have,
since the contest machine runs those.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from decode.forward import causal_lm
from engine.config import LoraConfig, ModelConfig
from engine.errors import UserError
from engine.files import sha256_of
from engine.lora import dense_weight, is_4bit, named_lora_linears
from engine.paths import check_adapter_dir, check_model_dir

log = logging.getLogger("engine")


def load_tokenizer(model_dir: str | Path):
    """From `tokenizer.json` when the directory has one, else by the class `tokenizer_config.json` names.

    Not AutoTokenizer: for A.X 4.0 Light it picks a class whose pre-tokenizer splits every number into
    digits, unlike the tokenizer the model was trained with.
    """
    import transformers

    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    else:
        cfg_path = model_dir / "tokenizer_config.json"
        if not cfg_path.is_file():
            raise UserError(f"{model_dir}: no tokenizer.json or tokenizer_config.json")
        name = json.loads(cfg_path.read_text(encoding="utf-8")).get("tokenizer_class") or "PreTrainedTokenizerFast"
        fast = name if name.endswith("Fast") else name + "Fast"
        cls = getattr(transformers, fast, None) or getattr(transformers, name, None)
        if cls is None:
            raise UserError(f"{cfg_path}: tokenizer_class {name} is not in this transformers")
        tok = cls.from_pretrained(str(model_dir))
    if tok.eos_token_id is None:
        raise UserError(f"{model_dir}: tokenizer has no eos token (expected <|im_end|>)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # A.X's config asks for the WordPiece space clean-up, which strips real spaces before punctuation from BPE
    # text; transformers 5 skips it (with a warning on every run) and 4.46 applies it: off, both decode alike.
    tok.clean_up_tokenization_spaces = False
    return tok


def use_nf4(cfg: ModelConfig) -> bool:
    """4-bit only on CUDA: bitsandbytes' CPU path repacks weights on the first no-grad forward and
    training fails afterwards on CPUs with AVX512-BF16."""
    if cfg.quant != "nf4":
        return False
    if not torch.cuda.is_available():
        log.warning("model.quant=nf4 asked for, but there is no CUDA device: loading plain fp32 weights "
                    "(4-bit is kept for CUDA)")
        return False
    return True


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_base_model(cfg: ModelConfig):
    """The frozen base model on the device it will run on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_model_dir(cfg.path)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs = dict(_dtype_kwargs(dtype), attn_implementation=cfg.attn_implementation)
    if use_nf4(cfg):
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), config=config, **kwargs)
    if cuda and "device_map" not in kwargs:
        model = model.to("cuda")
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def enable_checkpointing(model, kwargs: dict) -> None:
    """transformers' gradient checkpointing, by its name in the installed version (renamed in 5.x,
    where the old name warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(model, cfg: LoraConfig, gradient_checkpointing: bool):
    """Wrap `model` with fresh LoRA adapters on `cfg.targets`; only they are trainable."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.targets if t not in present]
    if missing:
        raise UserError(f"lora.targets: {', '.join(missing)} not found in the model")
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so the frozen embeddings
        # stay as they are (no enable_input_require_grads hook).
        enable_checkpointing(model, {"use_reentrant": False})
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """Attach a saved peft adapter; one made for another base model is a user error, not a traceback."""
    from peft import PeftModel

    adapter_dir = check_adapter_dir(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--adapter: {adapter_dir} does not fit this base model ({first[:200]})") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # bitsandbytes packs two 4-bit values a byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


TINY_SOURCE = "tiny_source.json"
"""Beside a tiny model: the data file it was built from and that file's sha256."""


def ensure_tiny_model(cfg: ModelConfig, texts_source: str, size: str = "demo") -> None:
    """Build the offline tiny model (engine.tiny's `size`) at `model.path` on first use when the recipe asks
    for it. Its tokenizer is trained on the data, so a tiny model built from other data, or of another size,
    is refused, never reused."""
    if not cfg.build_tiny:
        return
    path = Path(cfg.path)
    source = {"data": str(texts_source), "sha256": sha256_of(texts_source), "size": size}
    if (path / "config.json").is_file():
        record = path / TINY_SOURCE
        built = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
        if built is None or (built.get("sha256"), built.get("size")) != (source["sha256"], size):
            what = (f"from {built['data']} (sha256 {built['sha256'][:12]}, size {built.get('size', 'unrecorded')})"
                    if built else f"without a record of its data ({TINY_SOURCE})")
            raise UserError(f"model.path: {path} is a tiny model built {what}, not from {texts_source} "
                            f"(sha256 {source['sha256'][:12]}, size {size}); give this data its own, "
                            f"model.path={path}-{Path(texts_source).stem}, or delete {path} to rebuild it")
        return
    from engine.data import read_examples
    from engine.tiny import build_tiny_model

    examples = read_examples(texts_source, answer_text_mismatch="warn")
    log.info("building the tiny offline model at %s from %s", cfg.path, texts_source)
    texts = [e.question for e in examples] + [e.answer for e in examples if e.kind == "subj"]
    build_tiny_model(cfg.path, texts, size, extra_files={TINY_SOURCE: json.dumps(source, ensure_ascii=False)})


def merged_for_inference(model):
    """A plain transformers model computing what the 4-bit base + LoRA adapters compute: every 4-bit linear
    is dequantized (to exactly the weights training saw, not the original bf16 checkpoint) with its LoRA
    update added, and the peft wrapper goes.

    Generation is host-bound, and a merged projection is one matmul instead of dequantize + matmul + two
    LoRA matmuls and their glue. The price: the bf16 model's memory (~15 GB for A.X 4.0 Light, which an
    RTX 4090 holds) and the LoRA update rounded into bf16 weights.
    """

    lm = causal_lm(model)
    lora = dict(named_lora_linears(lm))
    quantized = {name: m for name, m in lm.named_modules() if is_4bit(getattr(m, "weight", None))
                 and not any(name.startswith(outer + ".") for outer in lora)}
    dtype = lm.get_input_embeddings().weight.dtype  # the unquantized weights' dtype: bf16 on CUDA
    for name, module in [*lora.items(), *quantized.items()]:
        base = module.base_layer if name in lora else module
        weight = dense_weight(base)
        for adapter in getattr(module, "active_adapters", []):
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).float()
        dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                device=weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        dense.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(lm.get_submodule(parent), child, dense)
        del weight
    return lm
