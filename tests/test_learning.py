"""The README's demo, as a newcomer runs it, learns: `python train.py recipes/tiny.yaml` builds the demo-size
tiny model from data/sample.csv and trains it; its held-out MC accuracy starts near chance and ends high.
A label shifted by one, wrong digit ids or a prompt that differs between training and eval fails here."""
from conftest import events, run_cli

from engine.sample_data import GLOSSARY


def test_the_demo_recipe_learns_the_held_out_questions(tmp_path):
    out = tmp_path / "run"
    # at one thread, as every test beside another worker: the same evals as at 2 threads, in 3 minutes, not 2
    r = run_cli("train.py", "recipes/tiny.yaml", f"model.path={tmp_path / 'model'}", f"output_dir={out}",
                timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = events(out, "eval")
    first, best = evals[0], max(evals, key=lambda e: e["final_score"])
    assert first["mc_accuracy"] <= 0.4, first
    assert max(e["mc_accuracy"] for e in evals) >= 0.8, [e["mc_accuracy"] for e in evals]
    assert best["final_score"] - first["final_score"] >= 0.25, (first["final_score"], best["final_score"])
    domains = {t.domain for t in GLOSSARY}
    for e in evals:
        assert set(e["by_domain"]) == domains
        assert sum(d["n_mc"] for d in e["by_domain"].values()) == e["n_mc"]
    learned = [line for line in r.stdout.splitlines() if line.startswith("learned: mc_accuracy")]
    assert learned and f"{first['mc_accuracy']:.2f} ->" in learned[0], r.stdout[-2000:]
    assert (out / "curves.png").stat().st_size > 10_000
