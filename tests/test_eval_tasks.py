"""Eval-set loaders and the task registry (jtranspeft.eval.tasks), on small fixture files."""

import json
import re

import pytest

from jtranspeft.eval import tasks
from jtranspeft.utils.errors import InputError


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_load_gsm8k(tmp_path):
    path = _write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "2+2?", "answer": "2+2=4\n#### 4"},
        {"question": "Big?", "answer": "lots\n#### 1,200"},
    ])
    items = tasks.load_gsm8k(path)
    assert [item["gold"] for item in items] == ["4", "1,200"]
    assert items[0] == {"task": "gsm8k", "index": 0, "prompt_instruction": "2+2?", "prompt_input": "",
                        "gold": "4", "entry": None}
    assert len(tasks.load_gsm8k(path, limit=1)) == 1


def test_gsm8k_bad_rows_name_file_row_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "ok", "answer": "#### 1"},
        {"question": "no answer here"},
    ])
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 2: .*'answer'"):
        tasks.load_gsm8k(path)
    no_hash = _write_jsonl(tmp_path / "nohash.jsonl", [{"question": "q", "answer": "just 5"}])
    with pytest.raises(ValueError, match=r"nohash\.jsonl, row 1: .*####"):
        tasks.load_gsm8k(no_hash)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl, row 2: not valid JSON"):
        tasks.load_gsm8k(broken)


def test_load_math_gold_from_answer_or_last_box(tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "p1", "solution": "first \\boxed{1}, finally $\\boxed{\\frac{1}{2}}$."},
        {"problem": "p2", "solution": "ignored \\boxed{9}", "answer": "3"},
    ])
    items = tasks.load_math(path)
    assert [item["gold"] for item in items] == ["\\frac{1}{2}", "3"]
    assert items[0]["prompt_instruction"] == "p1" and items[0]["task"] == "math"


def test_math_bad_rows(tmp_path):
    no_box = _write_jsonl(tmp_path / "nobox.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(ValueError, match=r"nobox\.jsonl, row 1: .*boxed"):
        tasks.load_math(no_box)
    no_problem = _write_jsonl(tmp_path / "noproblem.jsonl", [
        {"problem": "p", "answer": "1"}, {"problem": "p", "answer": "1"}, {"answer": "2"},
    ])
    with pytest.raises(ValueError, match=r"noproblem\.jsonl, row 3: .*'problem'"):
        tasks.load_math(no_problem)


def test_load_commonsense(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([
        {"instruction": "Q1 Answer format: answer1/answer2", "input": "", "output": "the correct answer is answer2",
         "answer": "answer2"},
        {"instruction": "Q2", "output": "answer1", "answer": "answer1"},
    ]), encoding="utf-8")
    items = tasks.load_commonsense(path, "arc_c")
    assert [item["gold"] for item in items] == ["answer2", "answer1"]
    assert items[1]["prompt_input"] == "" and items[1]["task"] == "arc_c"


def test_commonsense_bad_rows(tmp_path):
    path = tmp_path / "boolq.json"
    path.write_text(json.dumps([{"instruction": "q", "answer": "true"}, {"instruction": "q"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"boolq\.json, row 2: .*'answer'"):
        tasks.load_commonsense(path, "boolq")
    wrong_task = tmp_path / "piqa.json"
    wrong_task.write_text(json.dumps([{"instruction": "q", "answer": "solution1"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"piqa\.json, row 1: .*not a boolq label"):
        tasks.load_commonsense(wrong_task, "boolq")
    not_list = tmp_path / "obj.json"
    not_list.write_text(json.dumps({"instruction": "q"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list"):
        tasks.load_commonsense(not_list, "boolq")


def test_registry_names_and_scorers(tmp_path):
    expected = {"gsm8k", "math", "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"}
    assert set(tasks.TASKS) == expected

    gsm_path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 12"}])
    spec = tasks.get_task("gsm8k")
    (item,) = spec.load(gsm_path)
    assert spec.score("so... The answer is: 12.0", item)
    assert not spec.score("The answer is: 13", item)

    math_path = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "\\boxed{\\frac{3}{4}}"}])
    (item,) = tasks.get_task("math").load(math_path)
    assert tasks.get_task("math").score("The answer is: 0.75", item)

    with pytest.raises(ValueError, match="pass its path"):
        spec.load()


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'squad'.*gsm8k.*winogrande.*rg:"):
        tasks.get_task("squad")


def test_reasoning_gym_tasks():
    pytest.importorskip("reasoning_gym")
    spec = tasks.get_task("rg:basic_arithmetic")
    items = spec.load(limit=3, seed=5)
    assert len(items) == 3 and items[0]["task"] == "rg:basic_arithmetic"
    assert items[0]["entry"]["answer"] == items[0]["gold"]
    assert items[0]["prompt_instruction"] == items[0]["entry"]["question"]
    assert spec.load(limit=3, seed=5)[2]["gold"] == items[2]["gold"]  # same seed, same items
    assert spec.score(f"The answer is: {items[0]['gold']}", items[0])
    assert not spec.score("The answer is: not a number", items[0])
    with pytest.raises(ValueError, match="limit"):
        spec.load()
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        tasks.get_task("rg:no_such_dataset")


@pytest.mark.parametrize("typo, suggestion", [
    ("rg:chain_summ", "rg:chain_sum"),
    ("reasoning_gym:chain_sum2", "rg:chain_sum"),  # training's spelling of a reasoning-gym source
    ("chain_sum", "rg:chain_sum"),
    ("gsm8kk", "gsm8k"),
    ("winogrand", "winogrande"),
])
def test_a_task_typo_gets_the_nearest_name(typo, suggestion):
    with pytest.raises(InputError, match=re.escape(f"unknown task {typo!r}") + ".*"
                       + re.escape(f"; did you mean {suggestion!r}?")):
        tasks.get_task(typo)


def test_a_reasoning_gym_source_typo_gets_the_nearest_name():
    from jtranspeft.data.config import DataConfig
    from jtranspeft.data.sources import load_records

    with pytest.raises(InputError, match=r"unknown reasoning-gym task 'chain_summ'; did you mean 'chain_sum'\?"):
        load_records(DataConfig(source="reasoning_gym:chain_summ"))
