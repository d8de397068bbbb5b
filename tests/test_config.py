from pathlib import Path

import pytest

from engine.config import all_keys, load_recipe
from engine.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


BASE = "model:\n  path: m\ndata:\n  train: t.csv\ntrain:\n  lr: 1e-4\n  epochs: 1\n"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.name == path.stem and r.output_dir == f"runs/{path.stem}"


def test_children_hold_only_what_they_change():
    import yaml
    for name, changed in {"setA": {"train": {"lr": 2.0e-4, "scheduler": "linear"}},
                          "setB": {"lora": {"dropout": 0.0}},
                          "setC": {"train": {"sampler": {"subj_weight": 3.0}}},
                          "r32": {"lora": {"r": 32, "alpha": 64, "dropout": 0.0}}}.items():
        data = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text(encoding="utf-8"))
        assert data.pop("extends") == "baseline.yaml"
        assert data == changed, name


def test_baseline_has_the_brief_settings():
    r = load_recipe(ROOT / "recipes" / "baseline.yaml")
    assert (r.train.lr, r.train.scheduler, r.train.warmup_ratio) == (1e-4, "cosine", 0.03)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (16, 32, 0.05)
    assert len(r.lora.targets) == 7 and r.model.quant == "nf4"
    assert r.eval.every_steps == 250 and r.checkpoint.at_steps == [800, 1200] and r.checkpoint.every_epoch
    assert load_recipe(ROOT / "recipes" / "setA.yaml").train.lr == 2e-4
    assert load_recipe(ROOT / "recipes" / "setC.yaml").train.sampler.subj_weight == 3.0


def test_extends_merges_parent_first_and_overrides_last(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ntrain:\n  scheduler: linear\n")
    r = load_recipe(child, ["train.lr=2e-4", "train.sampler.subj_weight=3"])
    assert r.train.lr == 2e-4 and r.train.scheduler == "linear" and r.train.epochs == 1.0
    assert r.train.sampler.subj_weight == 3.0 and r.model.path == "m"


@pytest.mark.parametrize("text, overrides, message", [
    (BASE + "  lrr: 1\n", [], "unknown key train.lrr (did you mean train.lr?)"),
    (BASE, ["train.lrr=1"], "unknown key train.lrr (did you mean train.lr?)"),
    (BASE, ["train.nope.deep=1"], "unknown key train.nope.deep"),
    (BASE, ["train.lr=-1"], "train.lr must not be negative"),
    (BASE, ["train.epochs=0"], "train.epochs must be greater than 0"),
    (BASE, ["train.micro_batch=two"], "train.micro_batch must be an integer"),
    (BASE, ["train.micro_batch=2.5"], "train.micro_batch must be an integer"),
    (BASE, ["train.gradient_checkpointing=maybe"], "train.gradient_checkpointing must be true or false"),
    (BASE, ["train.scheduler=step"], "train.scheduler must be one of linear, cosine, constant"),
    (BASE, ["lora.dropout=1.5"], "lora.dropout must be between 0 and 1"),
    (BASE, ["train.label_smoothing=0.1"], "unknown key train.label_smoothing"),
    (BASE, ["train.lr"], "must look like section.key=value"),
    (BASE, ["checkpoint.at_steps=[0]"], "checkpoint.at_steps must be greater than 0, got [0]"),
    (BASE, ["train.keep_activations=2", "train.gradient_checkpointing=false"],
     "train.keep_activations only means something with train.gradient_checkpointing: true"),
    (BASE, ["train.keep_activations=-1"], "train.keep_activations must not be negative"),
    (BASE, ["train.save_matmuls=4"], "train.save_matmuls needs train.compile, train.recompute_in_graph and "
                                     "train.gradient_checkpointing: true"),
    (BASE, ["train.save_matmuls=4", "train.compile=true", "train.recompute_in_graph=false"],
     "train.save_matmuls needs train.compile"),
    (BASE, ["train.save_matmuls=true"], "train.save_matmuls must be an integer"),
    (BASE, ["train.save_matmuls=-1"], "train.save_matmuls must not be negative"),
    (BASE, ["train.dequant_in_graph=true", "train.expand_double_quant=true"],
     "train.dequant_in_graph needs train.compile and train.expand_double_quant: true"),
    (BASE, ["train.dequant_in_graph=true", "train.compile=true"], "train.dequant_in_graph needs train.compile"),
    (BASE, ["train.cuda_graphs=true", "train.packing=false"], "train.cuda_graphs needs train.packing: true"),
    ("model:\n  path: m\n", [], "data.train is required"),
    ("- a\n- b\n", [], "a recipe must be a mapping"),
    ("model: [unclosed\n", [], "not valid YAML"),
    (BASE + "lora: 3\n", [], "lora must be a mapping"),
])
def test_bad_recipes_are_rejected_with_the_key(tmp_path, text, overrides, message):
    path = write(tmp_path, "r.yaml", text)
    with pytest.raises(UserError, match=None) as e:
        load_recipe(path, overrides)
    assert message in str(e.value)


def test_missing_and_circular_extends(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="circular extends"):
        load_recipe(a)
    c = write(tmp_path, "c.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(UserError, match="extends: file not found"):
        load_recipe(c)
    with pytest.raises(UserError, match="recipe: file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_all_keys_lists_nested_sections():
    keys = set(all_keys())
    assert {"train.lr", "train.sampler.subj_weight", "eval.patience", "checkpoint.at_steps", "seed"} <= keys


def _fields_with(predicate):
    """(dotted key, field) of every recipe field, phases included, for which `predicate(field, type)` holds."""
    import dataclasses
    import typing

    from engine.config import PhaseConfig, Recipe

    found = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
            elif predicate(f, tp):
                found.append((prefix + f.name, f))

    walk(Recipe, "")
    walk(PhaseConfig, "train.sampler.phases.")
    return found


def _set(key: str, value) -> list[str]:
    """Overrides that give `key` the value (a phase key goes into a one-phase list)."""
    if key.startswith("train.sampler.phases."):
        return [f"train.sampler.phases=[{{{key.rsplit('.', 1)[1]}: {value}}}]"]
    return [f"{key}={value}"]


def test_every_enum_is_checked_from_its_type(tmp_path):
    """A Literal-typed key takes its listed values and refuses any other, naming them: no side table."""
    import typing
    enums = _fields_with(lambda f, tp: typing.get_origin(tp) is typing.Literal)
    assert {"model.quant", "train.scheduler", "train.speed", "train.sampler.phases.kinds"} <= {k for k, _ in enums}
    path = write(tmp_path, "r.yaml", BASE)
    for key, _ in enums:
        with pytest.raises(UserError) as e:
            load_recipe(path, _set(key, "nonsense"))
        assert f"{key} must be one of" in str(e.value) and "got 'nonsense'" in str(e.value), str(e.value)


@pytest.mark.parametrize("rule_name, bad", [("POSITIVE", 0), ("NON_NEGATIVE", -1), ("FRACTION", 1.5)])
def test_every_range_rule_beside_a_field_is_enforced(tmp_path, rule_name, bad):
    import engine.config as config
    rule = getattr(config, rule_name)
    keyed = _fields_with(lambda f, tp: f.metadata.get("rule") is rule)
    assert keyed, rule_name
    path = write(tmp_path, "r.yaml", BASE)
    for key, f in keyed:
        value = f"[{bad}]" if key == "checkpoint.at_steps" else bad
        with pytest.raises(UserError) as e:
            load_recipe(path, _set(key, value))
        assert f"{key} {rule.text}" in str(e.value), str(e.value)


def test_a_section_built_in_code_checks_itself():
    from engine.config import FieldError, TrainConfig
    with pytest.raises(FieldError, match="save_matmuls needs"):
        TrainConfig(save_matmuls=2)
    with pytest.raises(FieldError, match="micro_batch must be greater than 0"):
        TrainConfig(micro_batch=0)
    assert TrainConfig(compile=True, save_matmuls=2).save_matmuls == 2


def test_the_readme_key_table_is_the_dataclasses():
    """README's table of keys is the one engine/config.py prints: a renamed, added or re-documented field
    fails here until `python -m engine.config` is pasted into the README."""
    from engine.config import key_table
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert key_table() in readme
    documented = {line.split("`")[1] for line in key_table().splitlines()[2:]}
    assert set(all_keys()) <= documented
