"""Training speed and memory: the HF Trainer + prepare_model_for_kbit_training + peft recipe against our
loop, in one process on one card, on the same random A.X-shape model in 4-bit NF4.

Shapes: full-length random sequences (4 x 512, 8 x 1024, 8 x 2048; loss on every token) and the FSKU
length mix (micro-batch 8 and 16; loss on answer tokens only, HF padded to the longest row of each batch
as its collator does; `gmixN`: micro-batches of N sorted by length first, as `train.sampler.group_by_length`
does). Median step time of the steps after 3 warm-up steps, synchronised.

    python -m bench.bench_train MODEL_DIR OUT_JSON [--steps 13] [--shapes 4x512,8x1024,8x2048,mix8,mix16]
        [--hf-shapes ...] [--ours compile+absmax+keep4 --ours compile+absmax+keep2:8x2048] [--skip-hf]
        [--profile SHAPE]
        [--from-config ../shared/models/ax4-light-tokenizer]
"""
from __future__ import annotations

import argparse
import json
import gc
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.common import (StepTimer, card, fsku_length_mix, make_random_model, peak_gib, reset_peak, synchronize,
                          write_json)
from engine.config import LoraConfig, ModelConfig, TrainConfig
from engine.data import Encoded
from engine.batch import collate
from engine.loss import forward_backward
from engine.perf.levers import compile_layers, keep_activations

WARMUP = 3
VOCAB_LOW = 1000  # random ids above the special tokens


def batches_for(shape: str, steps: int, vocab: int, seed: int = 0) -> list[list[Encoded]]:
    """One micro-batch of Encoded items a step; full-length shapes carry labels on every token."""
    rng = np.random.default_rng(seed)
    low = min(VOCAB_LOW, vocab // 2)
    out = []
    if "mix" in shape:
        mb = int(shape.split("mix")[1])
        mix = fsku_length_mix(mb * steps, seed)
        if shape.startswith("g"):  # length-grouped, as train.sampler.group_by_length does over a window
            mix = sorted(mix, key=sum)
            chunks = [mix[k:k + mb] for k in range(0, len(mix), mb)]
            mix = [x for i in np.random.default_rng(seed).permutation(len(chunks)) for x in chunks[i]]
        for s in range(steps):
            items = []
            for p_len, a_len in mix[s * mb:(s + 1) * mb]:
                ids = rng.integers(low, vocab, p_len + a_len).tolist()
                items.append(Encoded(ids, [-100] * p_len + ids[p_len:], None))
            out.append(items)
        return out
    mb, seq = (int(x) for x in shape.split("x"))
    for _ in range(steps):
        items = []
        for _ in range(mb):
            ids = rng.integers(low, vocab, seq).tolist()
            items.append(Encoded(ids, list(ids), None))
        out.append(items)
    return out


def vocab_size(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def counts(steps: list[list[Encoded]]) -> tuple[float, float]:
    """Mean tokens a step as padded to the longest row, and mean real tokens a step."""
    padded = [len(b) * max(len(e.input_ids) for e in b) for b in steps]
    real = [sum(len(e.input_ids) for e in b) for b in steps]
    return float(np.mean(padded)), float(np.mean(real))


def hf_model(model_dir: str):
    """The HF recipe's model: 4-bit, prepare_model_for_kbit_training, peft LoRA on all seven projections."""
    from peft import LoraConfig as PeftLora, get_peft_model, prepare_model_for_kbit_training
    from engine.model import load_base_model

    model = load_base_model(ModelConfig(path=model_dir, quant="nf4"))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, PeftLora(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                          target_modules=LoraConfig().targets))


def length_grouping(on: bool) -> dict:
    """TrainingArguments' switch for HF's LengthGroupedSampler: `group_by_length` up to transformers 4.x,
    `train_sampling_strategy` in 5."""
    import dataclasses
    from transformers import TrainingArguments

    if "group_by_length" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"group_by_length": on}
    return {"train_sampling_strategy": "group_by_length" if on else "random"}


def run_hf(model, data: list[list[Encoded]], grad_accum: int = 1, group_by_length: bool = False,
           gradient_checkpointing: bool = True) -> dict:
    """HF Trainer on `data`'s steps (`grad_accum` micro-batches each), padded to each micro-batch's longest.
    `gradient_checkpointing` false leaves the model's own (Unsloth sets its own at get_peft_model)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    timer = StepTimer()

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.start()

        def on_step_end(self, args, state, control, **kw):
            timer.stop()

    def collate_fn(items):
        b = collate([Encoded(i["input_ids"], i["labels"], None) for i in items], 1)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    args = TrainingArguments(output_dir="/tmp/hf-bench", per_device_train_batch_size=len(data[0]) // grad_accum,
                             gradient_accumulation_steps=grad_accum, **length_grouping(group_by_length),
                             max_steps=len(data), learning_rate=1e-4, bf16=torch.cuda.is_available(),
                             gradient_checkpointing=gradient_checkpointing, optim="adamw_torch", logging_steps=10_000,
                             save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_drop_last=True,
                             seed=0, disable_tqdm=True)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for b in data for e in b]
    reset_peak()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_fn, callbacks=[Timing()])
    trainer.train()
    result = {"step_s": timer.median(WARMUP), "peak_gib": peak_gib()}
    del trainer
    gc.collect()
    return result


def levers_of(variant: str) -> TrainConfig:
    """'eager', or levers joined by '+': compile, fused_lora, absmax (train.expand_double_quant), keepN
    (train.keep_activations=N), outside (train.recompute_in_graph=false: transformers' checkpoint),
    savemmN (train.save_matmuls=N), dropk (train.dropout_kernel), dequant (train.dequant_in_graph)."""
    train = TrainConfig()
    for lever in set(variant.split("+")) - {"eager"}:
        if lever in ("compile", "fused_lora"):
            setattr(train, lever, True)
        elif lever == "absmax":
            train.expand_double_quant = True
        elif lever == "dropk":
            train.dropout_kernel = True
        elif lever == "dequant":
            train.dequant_in_graph = True
        elif lever == "outside":
            train.recompute_in_graph = False
        elif lever.startswith("savemm") and lever[6:].isdigit():
            train.save_matmuls = int(lever[6:])
        elif lever.startswith("keep") and lever[4:].isdigit():
            train.keep_activations = int(lever[4:])
        else:
            raise SystemExit(f"--ours {variant}: unknown lever {lever!r}")
    return train


def our_model(model_dir: str, train: TrainConfig | None = None):
    from engine.model import add_lora, load_base_model
    from engine.perf.levers import apply_speed_levers

    model = add_lora(load_base_model(ModelConfig(path=model_dir, quant="nf4")), LoraConfig(), True)
    apply_speed_levers(model, train or TrainConfig())
    model.train()
    return model


def run_ours(model, data: list[list[Encoded]], chunk: int = 4096) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available() or None)
    device = next(model.parameters()).device
    timer = StepTimer()
    reset_peak()
    losses = []
    for items in data:
        timer.start()
        loss = forward_backward(model, [collate(items, 1, device)], "token", chunk)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.stop()
        losses.append(float(loss))
    result = {"step_s": timer.median(WARMUP), "peak_gib": peak_gib(), "first_losses": losses[:3]}
    del opt
    gc.collect()
    return result


def profile_steps(model, data: list[list[Encoded]], table: Path) -> dict:
    """torch.profiler over `data` (one step each): host and device seconds a step, and the op table."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for items in data:
            forward_backward(model, [collate(items, 1, device)], "token", 4096)
        synchronize()
    model.zero_grad(set_to_none=True)
    avg = prof.key_averages()
    table.write_text(avg.table(sort_by="self_cuda_time_total", row_limit=40), encoding="utf-8")
    n = len(data)
    return {"self_cpu_s_per_step": sum(e.self_cpu_time_total for e in avg) / 1e6 / n,
            "self_cuda_s_per_step": sum(getattr(e, "self_device_time_total", 0) for e in avg) / 1e6 / n}


def time_shapes(model, runner, data: dict[str, list[list[Encoded]]]) -> dict[str, dict]:
    out = {}
    for shape, steps in data.items():
        padded, real = counts(steps)
        r = runner(model, steps)
        out[shape] = {"step_s": r["step_s"], "tokens_per_s": padded / r["step_s"],
                      "real_tokens_per_s": real / r["step_s"], "peak_gib": r["peak_gib"],
                      **({"first_losses": r["first_losses"]} if "first_losses" in r else {})}
        print(shape, {k: round(v, 3) if isinstance(v, float) else v for k, v in out[shape].items()}, flush=True)
    return out


def best_variants(variants: dict[str, dict], hf: dict[str, dict]) -> dict[str, dict]:
    """For each shape, the fastest variant of our loop whose peak memory is within HF's (the fastest of all
    while HF has not run, or where none is), with its name under "variant"."""
    ours: dict[str, dict] = {}
    for variant, shapes in variants.items():
        for shape, r in shapes.items():
            limit = hf.get(shape, {}).get("peak_gib", float("inf"))
            best = ours.get(shape)
            if best is None or (r["peak_gib"] <= limit, -r["step_s"]) > (best["peak_gib"] <= limit, -best["step_s"]):
                ours[shape] = {**r, "variant": variant}
    return ours


def fill_entries(results: dict, ours: dict[str, dict], hf: dict[str, dict], data: dict) -> None:
    """results["shapes"]: one entry per shape with our figures (`ours_*`), HF's (`hf_*`) and their ratios."""
    for shape in data:
        padded, real = counts(data[shape])
        entry = results["shapes"].setdefault(shape, {"padded_tokens_per_step": padded, "real_tokens_per_step": real})
        for prefix, figures in (("ours", ours), ("hf", hf)):  # ours_variant: the levers that ran the shape
            for key, value in figures.get(shape, {}).items():
                entry[f"{prefix}_{key}"] = value
        if "hf_step_s" in entry and "ours_step_s" in entry:
            entry["speedup_vs_hf"] = entry["hf_step_s"] / entry["ours_step_s"]
            entry["peak_mem_ratio_vs_hf"] = entry["ours_peak_gib"] / max(entry["hf_peak_gib"], 1e-9)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("out_json")
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--shapes", default="4x512,8x1024,8x2048,mix8,mix16", help="shapes of our loop")
    p.add_argument("--hf-shapes", help="shapes of the HF recipe (default: --shapes)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--ours", action="append", metavar="LEVERS[:SHAPES]",
                   help="a variant of our loop: 'eager' or levers joined by '+' (compile, fused_lora, absmax, "
                        "keepN, outside, savemmN, dropk, dequant), optionally with its own shapes; repeat for several; for each "
                        "shape the fastest variant within HF's peak memory fills the ours_* keys (default: eager)")
    p.add_argument("--profile", metavar="SHAPE", help="after timing, profile two steps of the last variant at SHAPE")
    p.add_argument("--from-config", metavar="DIR", help="first build the random model at MODEL_DIR from DIR's "
                                                         "config.json and tokenizer (skipped when it exists)")
    a = p.parse_args()
    if a.from_config:
        make_random_model(Path(a.from_config), Path(a.model_dir))
    results = {"card": card(), "date": time.strftime("%Y-%m-%d"), "steps": a.steps, "warmup": WARMUP, "shapes": {},
               "variants": {}}
    vocab = vocab_size(a.model_dir)
    shapes = a.shapes.split(",")
    hf_shapes = (a.hf_shapes or a.shapes).split(",")
    variants = [parse_variant(v, shapes) for v in a.ours or ["eager"]]
    data = {shape: batches_for(shape, a.steps, vocab)
            for shape in dict.fromkeys([s for *_, v_shapes in variants for s in v_shapes] + hf_shapes)}
    model, model_levers = None, None
    for n, (variant, train, v_shapes) in enumerate(variants):
        print("ours:", variant, v_shapes, flush=True)
        if model is not None and replace(train, keep_activations=0, save_matmuls=0) == model_levers:
            # same model: only where checkpointing stops and which layers keep their matmul outputs (layers
            # compiled again with options seen before reuse those graphs)
            keep_activations(model, train.keep_activations)
            if train.compile:
                compile_layers(model, in_graph=train.recompute_in_graph, save_matmuls=train.save_matmuls)
        else:
            model = None
            release_gpu_memory()
            model, model_levers = our_model(a.model_dir, train), replace(train, keep_activations=0, save_matmuls=0)
            if train.compile:  # compile once, outside the timed steps
                run_ours(model, data[v_shapes[0]][:2] * 2)
        timed = time_shapes(model, run_ours, {s: data[s] for s in v_shapes})
        results["variants"].setdefault(variant, {}).update(timed)
        if n == len(variants) - 1 and a.profile:
            results["ours_profile"] = profile_steps(model, batches_for(a.profile, 2, vocab),
                                                    Path(a.out_json).with_suffix(".profile.txt"))
        fill_entries(results, best_variants(results["variants"], {}), {}, data)
        write_json(Path(a.out_json), results)
    model = None
    release_gpu_memory()
    if not a.skip_hf:
        print("hf", flush=True)
        results["hf"] = time_shapes(hf_model(a.model_dir), run_hf, {s: data[s] for s in hf_shapes})
        fill_entries(results, best_variants(results["variants"], results["hf"]), results["hf"], data)
        write_json(Path(a.out_json), results)


def parse_variant(spec: str, default_shapes: list[str]) -> tuple[str, TrainConfig, list[str]]:
    """'LEVERS' or 'LEVERS:SHAPE,SHAPE': one variant of our loop (its name, its levers, the shapes it runs),
    parsed before any model loads so that a mistake costs no GPU time."""
    levers, _, shapes = spec.partition(":")
    return levers, levers_of(levers), shapes.split(",") if shapes else default_shapes


def release_gpu_memory() -> None:
    """Give the memory of dropped models back, so the next model's peak is its own, and drop their
    compiled graphs (the next variant may compile with other options)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
