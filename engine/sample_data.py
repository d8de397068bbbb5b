"""The project's sample data, generated: Korean financial-security QA in the FSKU shape, from a glossary.

    python -m engine.sample_data [--seed 0] [--out data]

writes `sample.csv` (training rows with answers: multiple-choice and short-answer, a `Domain` column) and
`sample_test.csv` (a test file as the contest gives one: `ID,Question` only). Deterministic from the seed.

Every glossary term has a domain, a definition and the key nouns of its definition. A multiple-choice question
asks which option describes a term; its options are the term's definition among other terms' definitions
(drawn anew for every question, in a new order). A short-answer question asks for the definition; its gold
answer is the definition and `Keyword` its nouns.

Each term's definition stands at the same option number in every question about the term (its answer key),
and the keys are spread evenly over the numbers, so every digit is right equally often and a position bias
scores chance. That keeps the questions learnable by the demo's tiny model in a minute on a CPU: the key is a
lookup from the term. Finding the option that matches the term in context is a skill a model of a few layers
does not acquire in minutes (bench/NOTES.md, issue 19: even full fine-tuning on 1-token items stays at
chance for 2,000 steps of 64), while a real 7B model has it from pretraining.
"""
from __future__ import annotations

import argparse
import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from engine.files import atomic_write_text


@dataclass(frozen=True)
class Term:
    term: str
    domain: str
    definition: str
    keywords: tuple[str, ...]


GLOSSARY = (
    Term("OTP", "전자금융", "일회용 비밀번호를 거래마다 새로 만들어 재사용 공격을 막는 인증 수단이다.", ("일회용", "비밀번호", "인증")),
    Term("전자서명", "전자금융", "서명자의 신원과 문서의 위변조 여부를 확인하게 해 주는 전자 정보이다.", ("서명자", "신원", "위변조")),
    Term("공동인증서", "전자금융", "공개키 기반 구조에서 인증기관이 발급해 본인임을 증명하는 전자 문서이다.", ("공개키", "인증기관", "본인")),
    Term("이상금융거래탐지시스템", "전자금융", "거래 패턴을 분석해 평소와 다른 의심 거래를 실시간으로 찾아 막는 시스템이다.", ("거래", "패턴", "의심")),
    Term("간편결제", "전자금융", "미리 등록한 결제 정보로 비밀번호나 생체 인증만으로 결제하는 서비스이다.", ("결제", "등록", "생체")),
    Term("전자금융거래", "전자금융", "금융회사가 전자적 장치로 제공하는 금융 서비스를 이용자가 비대면으로 이용하는 거래이다.", ("전자적", "장치", "비대면")),
    Term("가명처리", "개인정보보호", "추가 정보 없이는 특정 개인을 알아볼 수 없도록 개인정보의 일부를 바꾸는 처리이다.", ("추가", "정보", "개인")),
    Term("익명처리", "개인정보보호", "더 이상 개인을 알아볼 수 없도록 정보를 영구히 바꾸는 처리이다.", ("개인", "영구", "정보")),
    Term("정보주체", "개인정보보호", "처리되는 정보로 알아볼 수 있는 그 정보의 주체가 되는 사람이다.", ("처리", "주체", "사람")),
    Term("개인정보처리방침", "개인정보보호", "수집 목적과 보유 기간 등 개인정보 처리 기준을 공개한 문서이다.", ("수집", "목적", "보유")),
    Term("최소수집원칙", "개인정보보호", "목적에 필요한 최소한의 개인정보만 수집해야 한다는 원칙이다.", ("목적", "최소한", "원칙")),
    Term("개인정보영향평가", "개인정보보호", "대규모 개인정보를 다루는 시스템의 침해 위험을 미리 분석하고 개선하는 평가이다.", ("대규모", "위험", "평가")),
    Term("랜섬웨어", "침해사고대응", "파일을 암호화한 뒤 풀어 주는 대가로 금전을 요구하는 악성코드이다.", ("파일", "암호화", "금전")),
    Term("피싱", "침해사고대응", "금융기관을 사칭한 메시지로 이용자를 속여 금융 정보를 빼내는 수법이다.", ("금융기관", "사칭", "금융")),
    Term("스미싱", "침해사고대응", "문자 메시지 속 링크로 악성 앱을 설치하게 해 정보를 빼내는 수법이다.", ("문자", "링크", "악성")),
    Term("디도스", "침해사고대응", "다수의 감염된 기기로 트래픽을 몰아 서비스를 마비시키는 공격이다.", ("다수", "트래픽", "마비")),
    Term("침해사고", "침해사고대응", "해킹이나 악성코드로 정보시스템의 안전성이 훼손된 사고이다.", ("해킹", "정보시스템", "사고")),
    Term("포렌식", "침해사고대응", "사고 뒤에 디지털 증거를 수집하고 분석해 원인과 경위를 밝히는 절차이다.", ("디지털", "증거", "원인")),
    Term("망분리", "정보보호관리", "업무망과 인터넷망을 나누어 외부 침입이 내부로 번지지 않게 하는 보호 조치이다.", ("업무망", "인터넷망", "침입")),
    Term("접근통제", "정보보호관리", "권한에 따라 사용자가 접근할 수 있는 자원을 제한하는 보호 조치이다.", ("권한", "사용자", "자원")),
    Term("암호키관리", "정보보호관리", "키의 생성부터 폐기까지 전 과정을 안전하게 다루는 관리 활동이다.", ("생성", "폐기", "관리")),
    Term("백업", "정보보호관리", "장애나 사고에 대비해 데이터를 다른 곳에 복사해 두는 활동이다.", ("장애", "데이터", "복사")),
    Term("보안패치", "정보보호관리", "취약점이 발견된 소프트웨어를 고쳐 공격을 막는 업데이트이다.", ("취약점", "소프트웨어", "업데이트")),
    Term("위험평가", "정보보호관리", "자산의 위협과 취약점을 분석해 위험의 크기를 정하는 절차이다.", ("자산", "위협", "취약점")),
)

MC_STEMS = ("다음 중 {term}에 대한 설명으로 옳은 것은?", "{term}의 정의로 가장 적절한 것은?",
            "다음 중 {term}을(를) 바르게 설명한 것은?")
SUBJ_STEMS = ("{term}의 개념을 설명하시오.", "{term}이란 무엇인지 간단히 설명하세요.", "{term}에 대해 설명하시오.",
              "{term}의 의미를 서술하시오.")
TRAIN_COLUMNS = ("ID", "Question", "Answer", "Keyword", "Domain")
TEST_COLUMNS = ("ID", "Question")


@dataclass(frozen=True)
class AnswerKey:
    n_options: int
    answer: int
    """The option number the term's definition stands at."""


def answer_keys(glossary: Sequence[Term]) -> dict[str, AnswerKey]:
    """Every sixth term has 4 options, the others 5; within each group the answers cycle through 1..n, so for
    the 24-term glossary every number is the answer exactly equally often (4 of 4 terms, 20 of 5)."""
    keys, seen = {}, {4: 0, 5: 0}
    for k, term in enumerate(glossary):
        n = 4 if k % 6 == 5 else 5
        keys[term.term] = AnswerKey(n, 1 + seen[n] % n)
        seen[n] += 1
    return keys


def mc_question(rng: random.Random, term: Term, key: AnswerKey, stem: str, glossary: Sequence[Term]) -> str:
    """The stem and `key.n_options` options: other terms' definitions (a fresh draw, in a fresh order) with
    the term's own at `key.answer`."""
    options = [t.definition for t in rng.sample([t for t in glossary if t is not term], key.n_options - 1)]
    options.insert(key.answer - 1, term.definition)
    return "\n".join([stem.format(term=term.term)] + [f"{i} {text}" for i, text in enumerate(options, 1)])


def generate(seed: int, mc_per_term: int, subj_stems: Sequence[str], prefix: str,
             glossary: Sequence[Term] = GLOSSARY) -> list[dict]:
    """Rows for every term: `mc_per_term` multiple-choice questions (the stems in turn) and one short-answer
    question per stem in `subj_stems`, shuffled, with IDs `prefix0001`..."""
    rng = random.Random(seed)
    keys = answer_keys(glossary)
    rows = []
    for term in glossary:
        key = keys[term.term]
        for j in range(mc_per_term):
            question = mc_question(rng, term, key, MC_STEMS[j % len(MC_STEMS)], glossary)
            rows.append({"Question": question, "Answer": str(key.answer), "Keyword": "", "Domain": term.domain})
        for stem in subj_stems:
            rows.append({"Question": stem.format(term=term.term), "Answer": term.definition,
                         "Keyword": ",".join(term.keywords), "Domain": term.domain})
    rng.shuffle(rows)
    return [{"ID": f"{prefix}{i:04d}", **row} for i, row in enumerate(rows, 1)]


def to_csv(rows: list[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def sample_files(seed: int = 0) -> dict[str, str]:
    """File name -> CSV text: the training file (40 questions of each term, 3 short answers) and the test
    file (new instances: 2 questions of each term and a short-answer stem the training file never uses)."""
    train = generate(seed, mc_per_term=40, subj_stems=SUBJ_STEMS[:3], prefix="S")
    test = generate(seed + 1, mc_per_term=2, subj_stems=SUBJ_STEMS[3:], prefix="T")
    return {"sample.csv": to_csv(train, TRAIN_COLUMNS), "sample_test.csv": to_csv(test, TEST_COLUMNS)}


def write_sample(out: Path, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in sample_files(seed).items():
        atomic_write_text(out / name, text)
        paths.append(out / name)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.sample_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data"))
    args = parser.parse_args(argv)
    for path in write_sample(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
