from collections import Counter

from engine.config import PhaseConfig, SamplerConfig, TrainConfig
from engine.sampling import Sampler
from engine.schedule import lr_at

KINDS = ["mc"] * 80 + ["subj"] * 20
LENGTHS = [100 + (i * 37) % 200 for i in range(100)]


def cfg(**kw) -> TrainConfig:
    sampler = kw.pop("sampler", SamplerConfig())
    return TrainConfig(micro_batch=4, grad_accum=2, sampler=sampler, **kw)


def test_order_is_a_pure_function_of_seed_and_step():
    a, b = Sampler(KINDS, LENGTHS, cfg(epochs=3), 1), Sampler(KINDS, LENGTHS, cfg(epochs=3), 1)
    assert [a.batch_at(s) for s in range(30)] == [b.batch_at(s) for s in reversed(range(30))][::-1]
    assert a.batch_at(3) != Sampler(KINDS, LENGTHS, cfg(epochs=3), 2).batch_at(3)


def test_one_epoch_visits_every_example_once():
    s = Sampler(KINDS, LENGTHS, cfg(epochs=1), 0)
    assert s.total_steps == 13  # ceil(100 / 8)
    seen = [i for step in range(12) for i in s.batch_at(step)]
    assert len(set(seen)) == len(seen) == 96
    assert s.is_epoch_end(12) and not s.is_epoch_end(5)


def test_fractional_epochs():
    assert Sampler(KINDS, LENGTHS, cfg(epochs=0.3), 0).total_steps == 4  # ceil(30 / 8)


def test_subjective_weight_draws_three_times_as_often():
    s = Sampler(KINDS, LENGTHS, cfg(epochs=20, sampler=SamplerConfig(subj_weight=3.0)), 0)
    counts = Counter(KINDS[i] for step in range(s.total_steps) for i in s.batch_at(step))
    per_example = (counts["subj"] / 20) / (counts["mc"] / 80)
    assert 2.7 < per_example < 3.3


def chunks(indices, size):
    return [indices[k:k + size] for k in range(0, len(indices), size)]


def test_length_grouping_keeps_the_examples_and_cuts_padding():
    plain = Sampler(KINDS, LENGTHS, cfg(epochs=1), 0)
    grouped = Sampler(KINDS, LENGTHS, cfg(epochs=1, sampler=SamplerConfig(group_by_length=True)), 0)
    a = sorted(i for s in range(8) for i in plain.batch_at(s))
    b = sorted(i for s in range(8) for i in grouped.batch_at(s))
    assert a == b

    def padding(sampler):
        return sum(max(LENGTHS[i] for i in mb) * len(mb) - sum(LENGTHS[i] for i in mb)
                   for s in range(8) for mb in chunks(sampler.batch_at(s), 4))
    assert padding(grouped) < padding(plain) / 2


def test_curriculum_phases_draw_their_kinds():
    phases = [PhaseConfig("mc", 0.5), PhaseConfig("subj", 0.5), PhaseConfig("all", 1.0)]
    s = Sampler(KINDS, LENGTHS, cfg(sampler=SamplerConfig(phases=phases)), 0)
    kinds = [Counter(KINDS[i] for step in range(p.first_step, p.first_step + p.steps) for i in s.batch_at(step))
             for p in s.phases]
    assert set(kinds[0]) == {"mc"} and set(kinds[1]) == {"subj"} and set(kinds[2]) == {"mc", "subj"}
    assert [p.steps for p in s.phases] == [5, 2, 13]


def test_lr_schedules():
    kw = dict(base_lr=1.0, total_steps=100, warmup_ratio=0.1)
    assert lr_at(0, scheduler="cosine", **kw) == 0.1 and lr_at(9, scheduler="cosine", **kw) == 1.0
    assert abs(lr_at(55, scheduler="cosine", **kw) - 0.5) < 0.02
    assert abs(lr_at(55, scheduler="linear", **kw) - 0.5) < 0.01
    assert lr_at(99, scheduler="constant", **kw) == 1.0
    assert lr_at(99, scheduler="linear", **kw) < 0.02
    assert lr_at(99, scheduler="cosine", min_lr_ratio=0.1, **kw) >= 0.1
