"""Helpers shared by the GPU benchmarks: the random A.X-shape model, the FSKU length mix, timing."""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def make_random_model(config_dir: Path, out_dir: Path, layers: int = 0) -> Path:
    """A.X 4.0 Light's exact shape with random weights (bf16), saved with the real tokenizer files.
    Says nothing about accuracy; a faithful stand-in for speed and memory. `layers` > 0: only that many
    decoder layers (quick checks of what a layer computes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out_dir / "config.json").is_file():
        return out_dir
    config = AutoConfig.from_pretrained(str(config_dir))
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(str(tmp), max_shard_size="4GB")
    for name in TOKENIZER_FILES:
        if (config_dir / name).is_file():
            shutil.copy(config_dir / name, tmp / name)
    del model
    torch.cuda.empty_cache()
    tmp.rename(out_dir)
    return out_dir


def make_random_adapter(model_dir: Path, out_dir: Path, b_std: float = 1e-3) -> Path:
    """A LoRA adapter (r=16, all seven projections) for the random model, with non-zero B so that it takes
    part in every forward as a trained one does."""
    from engine.config import LoraConfig, ModelConfig
    from engine.model import add_lora, load_base_model

    if (out_dir / "adapter_config.json").is_file():
        return out_dir
    model = add_lora(load_base_model(ModelConfig(path=str(model_dir), quant="nf4")), LoraConfig(), False)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=b_std)
    model.save_pretrained(str(out_dir))
    del model
    torch.cuda.empty_cache()
    return out_dir


def fsku_length_mix(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt tokens, answer tokens) of n examples: 80% MC (prompt 60-140, answer digit + end-of-turn),
    20% subjective (prompt 45-65, answer 15-31), as A.X's tokenizer measures FSKU questions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.8:
            out.append((int(rng.integers(60, 141)), 2))
        else:
            out.append((int(rng.integers(45, 66)), int(rng.integers(15, 32))))
    return out


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        synchronize()
        self.times.append(time.perf_counter() - self._t0)

    def median(self, warmup: int) -> float:
        return statistics.median(self.times[warmup:])


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def card() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def cuda_ms(fn, repeat: int = 20) -> float:
    """Mean milliseconds of `fn` on the GPU over `repeat` calls after one warm-up."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat
