"""The sample data's generator: the committed files are its output, every answer is what its options say,
no option number is favoured, and the test file holds new instances of the same terms."""
import collections
import csv
import io

from conftest import ROOT

from engine.data import read_examples
from engine.options import question_options
from engine.sample_data import GLOSSARY, answer_keys, generate, main, sample_files

DEFINITION = {t.term: t for t in GLOSSARY}


def rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def term_of(question: str) -> str:
    """The glossary term a question names (the longest that occurs, since 전자금융거래 contains 전자금융)."""
    first = question.splitlines()[0]
    return max((t for t in DEFINITION if t in first), key=len)


def test_the_committed_sample_files_are_the_generators_output():
    for name, text in sample_files(seed=0).items():
        assert (ROOT / "data" / name).read_text(encoding="utf-8") == text, f"data/{name}: run python -m engine.sample_data"


def test_every_mc_answer_is_the_option_that_defines_the_questions_term():
    train = rows(sample_files(seed=0)["sample.csv"])
    mc = [r for r in train if question_options(r["Question"])]
    assert len(mc) == 40 * len(GLOSSARY)
    for r in mc:
        term = DEFINITION[term_of(r["Question"])]
        options = question_options(r["Question"])
        assert [o.number for o in options] == list(range(1, len(options) + 1))
        matching = [o.number for o in options if o.text == term.definition]
        assert matching == [int(r["Answer"])], r["ID"]
        assert len({o.text for o in options}) == len(options) and r["Domain"] == term.domain


def test_short_answers_are_the_definition_with_its_keywords():
    train = rows(sample_files(seed=0)["sample.csv"])
    subj = [r for r in train if not question_options(r["Question"])]
    assert len(subj) == 3 * len(GLOSSARY)
    for r in subj:
        term = DEFINITION[term_of(r["Question"])]
        assert r["Answer"] == term.definition and r["Keyword"].split(",") == list(term.keywords)
        assert all(k in term.definition for k in term.keywords)


def test_every_option_number_is_the_answer_equally_often():
    train = rows(sample_files(seed=0)["sample.csv"])
    by_count = collections.defaultdict(collections.Counter)
    for r in train:
        if options := question_options(r["Question"]):
            by_count[len(options)][r["Answer"]] += 1
    assert set(by_count) == {4, 5}
    for n, counts in by_count.items():
        assert sorted(counts) == [str(i) for i in range(1, n + 1)] and len(set(counts.values())) == 1, (n, counts)
    assert {k.n_options for k in answer_keys(GLOSSARY).values()} == {4, 5}


def test_the_test_file_is_new_instances_of_the_same_terms_without_answers():
    files = sample_files(seed=0)
    train_questions = {r["Question"] for r in rows(files["sample.csv"])}
    test = rows(files["sample_test.csv"])
    assert list(test[0]) == ["ID", "Question"]
    assert not train_questions & {r["Question"] for r in test}
    assert collections.Counter(term_of(r["Question"]) for r in test) == {t.term: 3 for t in GLOSSARY}


def test_four_domains_and_a_reader_that_takes_the_files(tmp_path):
    main(["--out", str(tmp_path), "--seed", "0"])
    examples = read_examples(tmp_path / "sample.csv")
    assert collections.Counter(e.domain for e in examples) == {d: 6 * 43 for d in {t.domain for t in GLOSSARY}}
    assert len({t.domain for t in GLOSSARY}) == 4
    assert len(read_examples(tmp_path / "sample_test.csv", require_answer=False)) == 3 * len(GLOSSARY)


def test_the_generator_is_deterministic_from_its_seed():
    assert generate(3, 2, ["{term}?"], "X") == generate(3, 2, ["{term}?"], "X")
    assert generate(3, 2, ["{term}?"], "X") != generate(4, 2, ["{term}?"], "X")
