"""python train.py RECIPE [section.key=value ...]: train LoRA adapters as the recipe says (see README)."""
from __future__ import annotations

from engine.errors import ArgumentParser, run_cli
from engine.quiet import quiet_library_noise


def main() -> int:
    quiet_library_noise()
    parser = ArgumentParser(description="Fine-tune with QLoRA from a recipe.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/setB.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied last")
    args = parser.parse_args()
    from engine.config import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    from engine import distributed
    from engine.loop import run
    try:
        summary = run(recipe, args.overrides)
    finally:
        distributed.cleanup()
    return 1 if summary.get("overfit_check", {}).get("verdict") == "FAIL" else 0


if __name__ == "__main__":
    run_cli(main)
