"""Tests for the built-in task families: record shape, splits, determinism and the judges' scores."""

from __future__ import annotations

import random
import re
import string

import pytest

from sapo.tasks import (
    ALL_FAMILIES,
    PARTIAL_CREDIT,
    STRUCTURED_FAMILIES,
    TASK_FAMILIES,
    judge,
    make_records,
    make_suite,
    prompt_of,
    score_responses,
    split_of,
)

RECORD_KEYS = {"messages", "task", "kind", "reference", "rejected", "params"}


@pytest.fixture(scope="module")
def records_by_family() -> dict[str, list[dict]]:
    return {
        family: make_records(family, 150, seed=0) + make_records(family, 50, seed=0, split="heldout")
        for family in TASK_FAMILIES
    }


def _record(task: str, kind: str, reference: str, **params) -> dict:
    """A hand-written record in the documented schema, so expected scores can be computed by hand."""
    full_params = {"n": 0, "char": "", "topic": "", "bound": 0, **params}
    return {
        "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": reference}],
        "task": task,
        "kind": kind,
        "reference": reference,
        "rejected": "",
        "params": full_params,
    }


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


def test_families_are_the_documented_three():
    assert set(TASK_FAMILIES) >= {"arithmetic", "string", "constraint"}


@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_records_share_one_schema_and_are_chats(records_by_family, family):
    for record in records_by_family[family]:
        assert set(record) == RECORD_KEYS
        assert record["task"] == family
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][1]["content"] == record["reference"]
        assert prompt_of(record) == record["messages"][0]["content"]
        assert {k: type(v) for k, v in record["params"].items()} == {"n": int, "char": str, "topic": str, "bound": int}
        assert 0 < len(prompt_of(record)) <= 40 and 0 < len(record["reference"]) <= 30


@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_reference_answers_score_exactly_one(records_by_family, family):
    for record in records_by_family[family]:
        assert judge(prompt_of(record), record["reference"], record) == 1.0
        assert judge(prompt_of(record), f"  {record['reference']}\n", record) == 1.0


@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_rejected_answers_differ_and_score_below_one(records_by_family, family):
    for record in records_by_family[family]:
        assert record["rejected"] != record["reference"]
        assert judge(prompt_of(record), record["rejected"], record) < 1.0


def test_arithmetic_rejected_answers_are_carry_borrow_or_off_by_one_slips(records_by_family):
    kinds = set()
    for record in records_by_family["arithmetic"]:
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt_of(record)).groups()
        a, b, reference, rejected = int(a), int(b), int(record["reference"]), int(record["rejected"])
        assert reference == (a + b if op == "+" else a - b) >= 0
        assert rejected >= 0 and record["rejected"] == str(rejected)
        if op == "+" and a % 10 + b % 10 >= 10:
            kinds.add("carry")
            assert rejected == reference - 10  # the carry was forgotten
        elif op == "-" and a % 10 < b % 10:
            kinds.add("borrow")
            assert rejected == (a // 10 - b // 10) * 10 + (b % 10 - a % 10)  # smaller digit from larger
        else:
            kinds.add("off by one")
            assert abs(rejected - reference) in (1, 10)
    assert kinds == {"carry", "borrow", "off by one"}


def test_string_rejected_answers_are_near_misses(records_by_family):
    for record in records_by_family["string"]:
        reference, rejected = record["reference"], record["rejected"]
        if record["kind"] == "upper":
            assert rejected.upper() == reference and sum(c.islower() for c in rejected) == 1
        else:
            same_letters = sorted(rejected) == sorted(reference)
            assert (same_letters and len(rejected) == len(reference)) or rejected == reference[:-1]


def test_constraint_rejected_answers_break_exactly_one_constraint(records_by_family):
    expected = {"repeat": 0.5, "lower_words": 2 / 3, "upper_words": 2 / 3, "numbers": 2 / 3}
    kinds = set()
    for record in records_by_family["constraint"]:
        kinds.add(record["kind"])
        assert judge(prompt_of(record), record["rejected"], record) == pytest.approx(expected[record["kind"]])
    assert kinds == set(expected)


# ------------------------------------------------------------------------------------------------
# Known answers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("47", 1.0),
        (" 47\n", 1.0),
        ("48", PARTIAL_CREDIT * 0.5),  # one of two characters right: ratio 2*1/4
        ("4", PARTIAL_CREDIT * 2 / 3),  # ratio 2*1/3
        ("47 and more", PARTIAL_CREDIT * 4 / 13),  # trailing junk is not fully correct
        ("47</s>", PARTIAL_CREDIT * 4 / 8),  # a literal EOS is junk: decode with skip_special_tokens
        ("", 0.0),
        ("99", 0.0),
    ],
)
def test_arithmetic_known_scores(response, expected):
    record = _record("arithmetic", "add", "47")
    assert judge("12+35=", response, record) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("dcba", 1.0),
        ("dcab", PARTIAL_CREDIT * 0.75),  # "dc" + one of "a"/"b" match: ratio 2*3/8
        ("abcd", PARTIAL_CREDIT * 0.25),  # one letter aligned: ratio 2*1/8
        ("DCBA", 0.0),  # case matters
        ("dcba.", PARTIAL_CREDIT * 8 / 9),
        ("", 0.0),
    ],
)
def test_string_known_scores(response, expected):
    record = _record("string", "reverse", "dcba")
    assert judge("reverse: abcd", response, record) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kind", "params", "response", "expected"),
    [
        ("repeat", {"n": 5, "char": "x"}, "xxxxx", 1.0),
        ("repeat", {"n": 5, "char": "x"}, "xxxx", 0.5),
        ("repeat", {"n": 5, "char": "x"}, "xxxxy", 0.5),
        ("repeat", {"n": 5, "char": "x"}, "xxxxx.", 0.0),
        ("repeat", {"n": 5, "char": "x"}, "", 0.0),
        # several valid answers: anything with 3 lowercase words, one of them the topic
        ("lower_words", {"n": 3, "topic": "cats"}, "cats are cute", 1.0),
        ("lower_words", {"n": 3, "topic": "cats"}, " big  soft cats ", 1.0),
        ("lower_words", {"n": 3, "topic": "cats"}, "Cats are cute", 2 / 3),
        ("lower_words", {"n": 3, "topic": "cats"}, "cats are cute too", 2 / 3),
        ("lower_words", {"n": 3, "topic": "cats"}, "dogs are cute", 2 / 3),
        ("lower_words", {"n": 3, "topic": "cats"}, "cats are cute!", 2 / 3),
        ("lower_words", {"n": 3, "topic": "cats"}, "", 0.0),
        ("upper_words", {"n": 2, "topic": "tea"}, "HOT TEA", 1.0),
        ("upper_words", {"n": 2, "topic": "tea"}, "hot TEA", 2 / 3),
        ("upper_words", {"n": 2, "topic": "tea"}, "hot tea now", 1 / 3),
        ("numbers", {"n": 3, "bound": 50}, "51 60 99", 1.0),
        ("numbers", {"n": 3, "bound": 50}, "99 60 51", 1.0),
        ("numbers", {"n": 3, "bound": 50}, "50 60 99", 2 / 3),
        ("numbers", {"n": 3, "bound": 50}, "51 60", 2 / 3),
        ("numbers", {"n": 3, "bound": 50}, "51 60 99 x", 1 / 3),
        ("numbers", {"n": 3, "bound": 50}, "51,60,99", 0.0),
        ("numbers", {"n": 3, "bound": 50}, "9" * 5000, 0.0),  # too long for int(): must not raise
    ],
)
def test_constraint_known_scores(kind, params, response, expected):
    record = _record("constraint", kind, "unused", **params)
    assert judge("?", response, record) == pytest.approx(expected)


def test_judge_never_raises_on_garbage(records_by_family, structured_records):
    rng = random.Random(0)
    alphabet = string.printable + "\u00e9\u4e2d\U0001f600\x00</s><|assistant|>"
    garbage = ["", " ", "\n\t", "-", "--1", "1e9", "9" * 10_000, "\x00", "</s>", "<|user|>", "\u00e9" * 50]
    garbage += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(100)]
    for records in [*records_by_family.values(), *structured_records.values()]:
        for record in records[:30]:
            for response in garbage:
                score = judge(prompt_of(record), response, record)
                assert 0.0 <= score <= 1.0 and isinstance(score, float)
            assert judge(prompt_of(record), None, record) == 0.0  # type: ignore[arg-type]


def test_judge_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        judge("?", "x", _record("poetry", "x", "x"))


# ------------------------------------------------------------------------------------------------
# Splits, determinism, suites
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_train_dev_and_heldout_prompts_are_disjoint(family):
    prompts = {split: {prompt_of(r) for r in make_records(family, 200, seed=1, split=split)}
               for split in ("train", "dev", "heldout")}
    assert all(prompts.values())
    assert not prompts["train"] & prompts["dev"] and not prompts["train"] & prompts["heldout"]
    assert not prompts["dev"] & prompts["heldout"]
    for split, texts in prompts.items():
        assert {split_of(p) for p in texts} == {split}


@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_make_records_is_deterministic_per_seed(family):
    first = make_records(family, 60, seed=5)
    assert first == make_records(family, 60, seed=5)
    assert first != make_records(family, 60, seed=6)
    assert len({prompt_of(r) for r in first}) == 60  # distinct while the prompt space allows


def test_make_records_allows_repeats_once_prompts_run_out():
    records = make_records("constraint", 1500, seed=0, split="heldout")
    assert len(records) == 1500
    assert len({prompt_of(r) for r in records}) < 1500


def test_make_records_rejects_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        make_records("poetry", 3, seed=0)
    with pytest.raises(ValueError, match="split"):
        make_records("arithmetic", 3, seed=0, split="test")


def test_make_suite_mixes_families_evenly_and_deterministically():
    suite = make_suite(31, 10, seed=3)
    assert set(suite) == {"train", "dev", "heldout"} and suite["dev"] == []
    assert len(suite["train"]) == 31 and len(suite["heldout"]) == 10
    counts = {family: sum(r["task"] == family for r in suite["train"]) for family in TASK_FAMILIES}
    assert sorted(counts.values()) == [10, 10, 11]
    tasks_in_order = [r["task"] for r in suite["train"]]
    assert tasks_in_order != sorted(tasks_in_order, key=TASK_FAMILIES.index)  # shuffled, not blocked
    assert suite == make_suite(31, 10, seed=3)
    assert suite != make_suite(31, 10, seed=4)
    train = {prompt_of(r) for r in suite["train"]}
    assert not train & {prompt_of(r) for r in suite["heldout"]}
    only = make_suite(4, 2, seed=0, families=("string",))
    assert {r["task"] for split in only.values() for r in split} == {"string"}


def test_score_responses_reports_overall_and_per_family():
    suite = make_suite(0, 30, seed=0)["heldout"]
    assert score_responses(suite, [r["reference"] for r in suite]) == {
        "overall": 1.0,
        "arithmetic": 1.0,
        "string": 1.0,
        "constraint": 1.0,
    }
    responses = [r["reference"] if r["task"] == "arithmetic" else "" for r in suite]
    scores = score_responses(suite, responses)
    assert scores == {"overall": pytest.approx(1 / 3), "arithmetic": 1.0, "string": 0.0, "constraint": 0.0}
    with pytest.raises(ValueError, match="responses"):
        score_responses(suite, responses[:-1])


# ------------------------------------------------------------------------------------------------
# Structured families: long answers, partial credit per step/line/sentence
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def structured_records() -> dict[str, list[dict]]:
    return {family: make_records(family, 200, seed=0) + make_records(family, 50, seed=0, split="heldout")
            for family in STRUCTURED_FAMILIES}


@pytest.mark.parametrize("family", STRUCTURED_FAMILIES)
def test_structured_answers_are_long_and_share_the_schema(structured_records, family):
    lengths = []
    for record in structured_records[family]:
        assert set(record) == RECORD_KEYS and record["task"] == family
        assert {k: type(v) for k, v in record["params"].items()} == {"n": int, "char": str, "topic": str, "bound": int}
        lengths.append(len(record["reference"]))
    assert min(lengths) >= 25 and max(lengths) <= 150
    assert sum(lengths) / len(lengths) >= 40  # long enough that a segment is a part of the answer, not all of it


@pytest.mark.parametrize("family", STRUCTURED_FAMILIES)
def test_structured_references_score_one_and_near_misses_keep_most_credit(structured_records, family):
    for record in structured_records[family]:
        assert judge(prompt_of(record), record["reference"], record) == 1.0
        assert judge(prompt_of(record), f"\n{record['reference']} \n", record) == 1.0
        rejected = judge(prompt_of(record), record["rejected"], record)
        assert record["rejected"] != record["reference"]
        assert 0.25 <= rejected < 1.0  # one local mistake costs a fraction, not everything


def _structured(task: str, prompt: str, reference: str, **params) -> dict:
    record = _record(task, task, reference, **params)
    record["messages"][0]["content"] = prompt
    return record


CHAIN = _structured("chain", "sum 47 38 15 62", "47+38=85\n85+15=100\n100+62=162\nanswer 162")


@pytest.mark.parametrize(("response", "expected"), [
    ("47+38=85\n85+15=100\n100+62=162\nanswer 162", 1.0),
    ("47+38=75\n75+15=90\n90+62=152\nanswer 152", 2 / 4),  # one slip: its step and the answer
    ("47+38=85\n85+15=100\n100+62=163\nanswer 163", 2 / 4),
    ("47+38=85\n85+15=100", 2 / 4),  # stopped early
    ("47+38=85\n85+15=100\n100+62=162\nanswer 162\nanswer 162", 4 / 5),  # an extra line costs
    ("47+38=85\nblah\n100+62=162\nanswer 162", 3 / 4),  # a garbled step; the chain resumes from the truth
    ("answer 162", 0.0),  # the answer on the wrong line does not count
    ("", 0.0),
])
def test_chain_credit_follows_the_models_own_chain(response, expected):
    assert judge("?", response, CHAIN) == pytest.approx(expected)


LISTING = _structured("listing", "sort: pear fig apple", "1. apple\n2. fig\n3. pear")


@pytest.mark.parametrize(("response", "expected"), [
    ("1. apple\n2. fig\n3. pear", 1.0),
    ("1. fig\n2. apple\n3. pear", 1 / 3),
    ("1. apple\n2. fig", 2 / 3),
    ("1. apple\n2. fig\n3. pear\n4. kiwi", 3 / 4),
    ("apple\nfig\npear", 0.0),
])
def test_listing_known_scores(response, expected):
    assert judge("?", response, LISTING) == pytest.approx(expected)


PROFILE = _structured("profile", "facts: name=Bo age=7 city=Oslo pet=cat",
                      "Bo is 7 years old. Bo lives in Oslo. Bo has a cat.")


@pytest.mark.parametrize(("response", "expected"), [
    ("Bo is 7 years old. Bo lives in Oslo. Bo has a cat.", 1.0),
    ("Bo has a cat. Bo is 7 years old. Bo lives in Oslo.", 1.0),  # facts in any order
    ("Bo is 8 years old. Bo lives in Oslo. Bo has a cat.", 2 / 3),
    ("Bo is 7 years old. Bo is 7 years old. Bo is 7 years old.", 1 / 3),  # repeating a fact earns it once
    ("Bo is 7 years old. Bo lives in Oslo. Bo has a cat. Bo likes rice.", 3 / 4),
])
def test_profile_known_scores(response, expected):
    assert judge("?", response, PROFILE) == pytest.approx(expected)


FORMAT = _structured("format", "write 2 lines about cats, 3 words each, ending with !", "Big cats run!\nCats are calm!",
                     n=2, char="!", topic="cats", bound=3)


@pytest.mark.parametrize(("response", "expected"), [
    ("Big cats run!\nCats are calm!", 1.0),
    ("Cats sing well!\nOld red cats!", 1.0),  # another valid answer
    ("Big cats run!\nCats are calm.", 7 / 8),  # one wrong mark
    ("big cats run!\nCats are very calm!", 6 / 8),  # lowercase start; four words
    ("Big cats run!\nDogs are calm!", 7 / 8),
    ("Big cats run!", 4 / 8),
    ("Big cats run!\nCats are calm!\nCats cats cats!", 8 / 12),  # an extra line costs
    ("Big cats run!!\nCats are calm!", 7 / 8),
])
def test_format_known_scores(response, expected):
    assert judge("?", response, FORMAT) == pytest.approx(expected)


def test_score_responses_orders_structured_families_after_the_short_ones():
    suite = make_suite(0, 14, seed=0, families=ALL_FAMILIES)["heldout"]
    assert list(score_responses(suite, [r["reference"] for r in suite])) == ["overall", *ALL_FAMILIES]
