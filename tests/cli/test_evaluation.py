"""`sapo eval`: exact scores of known responses, win rates, judge specs, output JSON."""

from __future__ import annotations

import json

import pytest

from sapo import tasks, tiny
from sapo.cli import eval as evaluation
from sapo.cli.eval import format_table
from sapo.errors import UsageError
from sapo.judging import build_report, load_judge, prompt_ids, win_rates

# ------------------------------------------------------------------------------------------------
# win rates
# ------------------------------------------------------------------------------------------------


def test_win_rates_all_wins_and_all_losses():
    result = win_rates({"a": [1.0, 0.5, 0.2], "b": [0.0, 0.4, 0.1]})
    assert result["a"]["b"] == {"wins": 3, "ties": 0, "losses": 0, "n": 3, "win_rate": 1.0}
    assert result["b"]["a"] == {"wins": 0, "ties": 0, "losses": 3, "n": 3, "win_rate": 0.0}


def test_win_rates_all_ties_is_one_half():
    result = win_rates({"a": [0.3, 1.0], "b": [0.3, 1.0]})
    assert result["a"]["b"] == {"wins": 0, "ties": 2, "losses": 0, "n": 2, "win_rate": 0.5}
    assert result["b"]["a"]["win_rate"] == 0.5


def test_win_rates_mixed_counts_a_tie_as_half_a_win():
    result = win_rates({"a": [1.0, 0.5, 0.0, 1.0], "b": [0.0, 0.5, 1.0, 0.5]})
    assert result["a"]["b"] == {"wins": 2, "ties": 1, "losses": 1, "n": 4, "win_rate": 0.625}
    assert result["b"]["a"] == {"wins": 1, "ties": 1, "losses": 2, "n": 4, "win_rate": 0.375}


def test_win_rates_cover_every_ordered_pair_and_are_complementary():
    scores = {"a": [0.1, 0.9, 0.5], "b": [0.2, 0.9, 0.4], "c": [0.0, 0.0, 1.0]}
    result = win_rates(scores)
    assert {a: sorted(result[a]) for a in result} == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}
    for a in scores:
        for b in result[a]:
            assert result[a][b]["win_rate"] + result[b][a]["win_rate"] == pytest.approx(1.0)


def test_win_rates_tolerance_turns_near_equal_scores_into_ties():
    assert win_rates({"a": [0.5 + 1e-12], "b": [0.5]}, tolerance=1e-9)["a"]["b"]["ties"] == 1


def test_win_rates_reject_unequal_or_empty_score_lists():
    with pytest.raises(ValueError, match="one score per prompt"):
        win_rates({"a": [1.0, 0.0], "b": [1.0]})
    with pytest.raises(ValueError, match="at least one prompt"):
        win_rates({"a": [], "b": []})


# ------------------------------------------------------------------------------------------------
# judge specs
# ------------------------------------------------------------------------------------------------


def test_load_judge_resolves_module_function_and_file_path(tmp_path):
    assert load_judge("sapo.tasks:judge") is tasks.judge
    file = tmp_path / "my_judges.py"
    file.write_text("def by_length(prompt, response, record):\n    return float(len(response))\n")
    judge = load_judge(f"{file}:by_length")
    assert judge("p", "abc", {}) == 3.0


@pytest.mark.parametrize("spec,message", [
    ("sapo.tasks.judge", "expected module:function"),
    ("sapo.tasks:", "expected module:function"),
    (":judge", "expected module:function"),
    ("no_such_module_for_sapo_tests:judge", "cannot import module 'no_such_module_for_sapo_tests'"),
    ("sapo.tasks:no_such_judge", "module 'sapo.tasks' has no attribute 'no_such_judge'"),
    ("sapo.tasks:TASK_FAMILIES", "'TASK_FAMILIES' is a tuple, not a callable"),
    ("missing_file.py:score", "no such file 'missing_file.py'"),
])
def test_bad_judge_spec_is_a_usage_error(spec, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_judge(spec)


# ------------------------------------------------------------------------------------------------
# report and table, without a model
# ------------------------------------------------------------------------------------------------


def known_responses(records):
    """Model 'right' answers every prompt with its reference, 'wrong' with the record's realistic mistake."""
    return {"right": [r["reference"] for r in records], "wrong": [r["rejected"] for r in records]}


def test_build_report_scores_known_responses_exactly():
    records = tasks.make_suite(0, 9, seed=3)["heldout"]
    prompts = [r["messages"][:-1] for r in records]
    report = build_report(prompts, records, known_responses(records), tasks.judge, judge_name="sapo.tasks:judge")
    wrong_scores = [tasks.judge(tasks.prompt_of(r), r["rejected"], r) for r in records]
    assert report["models"]["right"]["score"] == 1.0
    assert report["models"]["wrong"]["score"] == pytest.approx(sum(wrong_scores) / 9)
    assert report["models"]["right"]["by_family"] == {"arithmetic": 1.0, "string": 1.0, "constraint": 1.0}
    expected = tasks.score_responses(records, [r["rejected"] for r in records])
    assert report["models"]["wrong"]["by_family"] == pytest.approx({f: expected[f] for f in tasks.TASK_FAMILIES})
    assert report["models"]["right"]["mean_length"] == pytest.approx(sum(len(r["reference"]) for r in records) / 9)
    assert report["win_rates"]["right"]["wrong"] == {"wins": 9, "ties": 0, "losses": 0, "n": 9, "win_rate": 1.0}
    assert report["per_prompt"][0]["scores"]["wrong"] == wrong_scores[0]
    table = format_table(report)
    assert "right vs wrong" in table and "1.000" in table
    assert "(wins + 0.5 * ties)" in table and "constraint" in table


def test_report_without_task_field_has_no_families_and_judge_errors_name_the_prompt():
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    records = [{"prompt": "hi", "completion": "a"}] * 2
    report = build_report(prompts, records, {"m": ["xx", "y"]}, lambda p, r, rec: len(r))
    assert report["families"] == [] and report["models"]["m"]["score"] == 1.5 and report["win_rates"] == {}
    with pytest.raises(UsageError, match="failed on prompt 0.*default judge only scores records of the built-in"):
        build_report(prompts, records, {"m": ["a", "b"]}, tasks.judge, judge_name="sapo.tasks:judge")
    with pytest.raises(UsageError, match="returned 'bad' for prompt 0; expected a number"):
        build_report(prompts, records, {"m": ["a", "b"]}, lambda p, r, rec: "bad")
    with pytest.raises(UsageError, match="expected a finite number"):
        build_report(prompts, records, {"m": ["a", "b"]}, lambda p, r, rec: float("nan"))


# ------------------------------------------------------------------------------------------------
# `sapo eval` end to end, with two tiny model directories
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    tokenizer = tiny.build_tokenizer()
    dirs = []
    for seed in (0, 1):
        directory = tmp_path_factory.mktemp(f"model{seed}")
        tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=seed), tokenizer,
                       directory)
        dirs.append(str(directory))
    return dirs


def test_eval_with_fake_generation_scores_known_outputs_exactly(two_models, tmp_path, monkeypatch):
    right, wrong = two_models
    records = tasks.make_suite(0, 6, seed=5)["heldout"]
    answers = {right: [r["reference"] for r in records], wrong: [r["rejected"] for r in records]}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        expected = [r["messages"][:-1] for r in records]
        assert [list(p) for p in prompts] == expected
        return answers[model.config._name_or_path]

    monkeypatch.setattr(evaluation, "generate_responses", fake_generate)
    output = tmp_path / "results.json"
    assert evaluation.main([right, wrong, "--suite", "heldout", "--n", "6", "--seed", "5",
                            "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["models"][right]["score"] == 1.0
    wrong_scores = [tasks.judge(tasks.prompt_of(r), r["rejected"], r) for r in records]
    assert report["models"][wrong]["score"] == pytest.approx(sum(wrong_scores) / 6)
    assert report["win_rates"][right][wrong]["win_rate"] == 1.0
    assert report["win_rates"][wrong][right] == {"wins": 0, "ties": 0, "losses": 6, "n": 6, "win_rate": 0.0}
    assert [p["responses"][wrong] for p in report["per_prompt"]] == answers[wrong]
    assert report["settings"]["decoding"] == "greedy" and report["judge"] == "sapo.tasks:judge"


def test_eval_suite_dev_split_of_structured_families(two_models, tmp_path, monkeypatch):
    records = tasks.make_suite(0, 0, n_dev=8, seed=1, families=tasks.STRUCTURED_FAMILIES)["dev"]
    monkeypatch.setattr(evaluation, "generate_responses",
                        lambda model, tokenizer, prompts, **kwargs: [r["rejected"] for r in records])
    output = tmp_path / "results.json"
    assert evaluation.main([two_models[0], "--suite", "dev", "--families", "structured", "--n", "8", "--seed", "1",
                            "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    result = report["models"][two_models[0]]
    assert report["families"] == list(tasks.STRUCTURED_FAMILIES) and len(result["by_family"]) == 4
    expected = [tasks.judge(tasks.prompt_of(r), r["rejected"], r) for r in records]
    assert result["score"] == pytest.approx(sum(expected) / 8) and 0.25 < result["score"] < 1.0
    assert report["settings"]["suite"] == "dev" and report["settings"]["families"] == "structured"


def test_eval_generates_with_real_models_and_a_length_judge(two_models, tmp_path, capsys):
    judge_file = tmp_path / "length_judge.py"
    judge_file.write_text("def score(prompt, response, record):\n    return len(response)\n")
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1), "task": "arithmetic" if i % 2 else "other"}
            for i in range(5)]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    output = tmp_path / "out" / "eval.json"
    assert evaluation.main([*two_models, "--data", str(data), "--judge", f"{judge_file}:score",
                            "--max_new_tokens", "6", "--batch_size", "2", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["n_prompts"] == 5 and report["families"] == ["arithmetic", "other"]
    for label in two_models:
        responses = [p["responses"][label] for p in report["per_prompt"]]
        assert [p["scores"][label] for p in report["per_prompt"]] == [float(len(r)) for r in responses]
        assert report["models"][label]["score"] == pytest.approx(sum(map(len, responses)) / 5)
        assert report["models"][label]["mean_length"] == report["models"][label]["score"]
        # the same responses as generating directly with the loaded model from the raw text of the plain-text
        # prompts (as training renders these records), not from the chat template
        model, tokenizer = evaluation.load_model(label)
        prompts = [row["prompt"] for row in rows]
        assert evaluation.generate_responses(model, tokenizer, prompts, max_new_tokens=6) == responses
        chats = [[{"role": "user", "content": row["prompt"]}] for row in rows]
        assert prompt_ids(tokenizer, prompts[0]) != prompt_ids(tokenizer, chats[0])
    a, b = two_models
    rates = report["win_rates"]
    assert rates[a][b]["wins"] + rates[a][b]["ties"] + rates[a][b]["losses"] == 5
    assert rates[a][b]["wins"] == rates[b][a]["losses"]
    printed = capsys.readouterr().out
    assert f"{a} vs {b}" in printed and "win rate" in printed


def test_eval_sampling_is_seeded(two_models, tmp_path):
    outputs = []
    for name in ("a.json", "b.json"):
        output = tmp_path / name
        evaluation.main([two_models[0], "--suite", "heldout", "--n", "4", "--sample", "--temperature", "1.0",
                         "--max_new_tokens", "5", "--output", str(output)])
        outputs.append(json.loads(output.read_text()))
    assert outputs[0]["per_prompt"] == outputs[1]["per_prompt"]
    assert outputs[0]["settings"]["decoding"] == "sample" and outputs[0]["win_rates"] == {}


@pytest.mark.parametrize("extra,message", [
    (["--suite", "heldout", "--data", "x.jsonl"], "exactly one of --data FILE and --suite"),
    ([], "exactly one of --data FILE and --suite"),
    (["--suite", "heldout", "--judge", "nocolon"], "expected module:function"),
    (["--suite", "heldout", "--n", "0"], "--n must be >= 1"),
    (["--suite", "heldout", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--suite", "heldout", "--families", "chain,poetry"], "--families 'chain,poetry': unknown poetry"),
    (["--suite", "dev", "--families", ","], "unknown \\(none given\\)"),
])
def test_eval_usage_errors(two_models, extra, message):
    with pytest.raises(UsageError, match=message):
        evaluation.main([two_models[0], *extra])


def test_eval_rejects_missing_model_dirs_before_generating(two_models, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "generate_responses", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(UsageError, match="directory has no model"):
        evaluation.main([two_models[0], str(tmp_path), "--suite", "heldout", "--n", "2"])
    with pytest.raises(UsageError, match="given twice"):
        evaluation.main([two_models[0], two_models[0], "--suite", "heldout"])


def test_eval_default_judge_on_data_without_task_explains_itself(two_models, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    monkeypatch.setattr(evaluation, "generate_responses", lambda model, tok, prompts, **k: ["x"] * len(prompts))
    with pytest.raises(UsageError, match="pass --judge module:function for other data"):
        evaluation.main([two_models[0], "--data", str(data)])


def test_eval_accepts_prompt_only_records(two_models, tmp_path):
    """An eval set of prompts with judge fields needs no reference answer."""
    judges = tmp_path / "judges.py"
    judges.write_text("def length(prompt, response, record):\n    return float(len(response) <= record['limit'])\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "limit": 500}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "2+2="}], "limit": 500}) + "\n")
    output = tmp_path / "report.json"
    assert evaluation.main([two_models[0], "--data", str(data), "--judge", f"{judges}:length", "--max_new_tokens",
                            "4", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert len(report["per_prompt"]) == 2


def test_eval_of_a_base_model_answers_plain_text_and_refuses_chats_before_the_weights(tmp_path):
    """A tokenizer without a chat template: plain-text prompts are answered from the raw text; chat prompts are
    refused with the fix, before the model's weights (garbage here) are read."""
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = None
    base = tmp_path / "base"
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), tokenizer, base)
    judge = tmp_path / "judge.py"
    judge.write_text("def score(prompt, response, record):\n    return float(len(response))\n")
    plain, chat = tmp_path / "plain.jsonl", tmp_path / "chat.jsonl"
    plain.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1="}]}) + "\n")
    options = ["--judge", f"{judge}:score", "--max_new_tokens", "3"]
    assert evaluation.main([str(base), "--data", str(plain), *options]) == 0
    (base / "model.safetensors").write_bytes(b"garbage" * 100)
    with pytest.raises(UsageError, match=rf"^{base}: the tokenizer has no chat template to render the conversational "
                                         r"prompts: pass --chat_template chatml"):
        evaluation.main([str(base), "--data", str(chat), *options])
