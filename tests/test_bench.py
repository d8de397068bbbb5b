"""The GPU benchmark's bookkeeping, on the CPU: which variant of our loop a shape reports."""
from bench.bench_train import best_variants, levers_of


def test_each_shape_reports_its_fastest_variant_within_hf_memory():
    variants = {"fast": {"4x512": {"step_s": 0.18, "peak_gib": 10.3}, "8x1024": {"step_s": 0.7, "peak_gib": 30.0}},
                "lean": {"4x512": {"step_s": 0.19, "peak_gib": 10.1}, "8x1024": {"step_s": 0.6, "peak_gib": 31.0}}}
    hf = {"4x512": {"peak_gib": 10.2}, "8x1024": {"peak_gib": 20.0}}
    picked = best_variants(variants, hf)
    assert picked["4x512"]["variant"] == "lean"  # "fast" needs more memory than HF
    assert picked["8x1024"] == {"step_s": 0.6, "peak_gib": 31.0, "variant": "lean"}  # none fits: the fastest
    assert best_variants(variants, {})["4x512"]["variant"] == "fast"  # before HF has run


def test_bench_levers_are_recipe_switches():
    train = levers_of("compile+absmax+dequant+savemm2+keep4")
    assert (train.compile, train.expand_double_quant, train.dequant_in_graph) == (True, True, True)
    assert (train.save_matmuls, train.keep_activations) == (2, 4)
