"""Trans-LoRA-style distillation on a tiny (old, new) pair: the distilled adapter is closer to the teacher than
the copied one, measured by the label-free fidelity on the task's prompts.

A random tiny base writes token soup as "synthetic prompts", so here the seed instructions (which the
distillation set includes, as Trans-LoRA's does) carry the task; whether synthetic prompts alone carry over
to real task prompts is a property of real models (issue 14's SmolLM2 run). The first test measures fidelity on
the seed prompts themselves (in sample: the distillation mechanism); migrate judges on a held-out half of the
probes (tests/test_migrate.py)."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jtranspeft as jt
from jtranspeft.data.prompts import alpaca_prompt
from jtranspeft.data.config import DataConfig
from jtranspeft.migration.distill import (NEAR_DUPLICATE_JACCARD, distill_transfer, near_duplicate, student_config,
                                          synthesis_stats, synthesize_prompts)
from jtranspeft.migration.fidelity import fidelity
from jtranspeft.peft.transpeft import TransPeftConfig
from jtranspeft.training.config import ModelConfig, RunConfig
from jtranspeft.training.finetune import base_differences, base_settings, train
from jtranspeft.utils.config_io import load_config, to_dict
from jtranspeft.utils.errors import InputError
from test_train import _config_file


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir, tiny_task_file):
    """(teacher adapter dir trained on the tiny base, new base dir: the base with its FFN moved, task prompts)."""
    root = tmp_path_factory.mktemp("distill")
    recipe = _config_file(root, tiny_model_dir, tiny_task_file, lora={"dropout": 0.0},
                          transpeft={"p_mask": 0.0, "p_drop": 0.0},
                          train={"max_steps": 60, "grad_accum": 1, "batch_size": 8}, checkpoint={"every": 100})
    train(load_config(RunConfig, [recipe]))
    old = jt.load_base(tiny_model_dir)
    mlp = old.params["layers"]["mlp"]
    keys = jax.random.split(jax.random.key(3), len(mlp))
    moved = {name: {"kernel": m["kernel"] + 0.15 * jax.random.normal(k, m["kernel"].shape) * m["kernel"].std()}
             for (name, m), k in zip(mlp.items(), keys)}
    new = old.replace(params={**old.params, "layers": {**old.params["layers"], "mlp": moved}})
    jt.save_base(new, root / "new")
    prompts = sorted({json.loads(line)["instruction"] for line in tiny_task_file.read_text().splitlines()})
    return root / "run" / "adapter", root / "new", prompts


def test_distillation_brings_the_adapter_closer_to_the_teacher(tmp_path, pair, tiny_model_dir):
    adapter, new_dir, prompts = pair
    old, new = jt.load_base(tiny_model_dir), jt.load_base(new_dir)
    teacher = jt.load_peft(adapter, old)
    result = distill_transfer(old, adapter, new_dir, prompts, tmp_path / "d", samples=12, steps=30, lr=2e-3,
                              max_new_tokens=10)
    records = [json.loads(line) for line in (tmp_path / "d" / "synthetic.jsonl").read_text().splitlines()]
    assert len(records) == result["records"] >= 8 and all(r["output"] for r in records)
    distilled = jt.load_peft(result["adapter"], new)
    probe = [alpaca_prompt(p, "") for p in prompts]
    copied = fidelity(old, teacher, new, jt.load_peft(adapter, new), probe, max_new_tokens=4)
    got = fidelity(old, teacher, new, distilled, probe, max_new_tokens=4)
    copied_kl, distilled_kl = copied["kl"], got["kl"]
    assert distilled_kl < 0.5 * copied_kl, (distilled_kl, copied_kl)  # measured here: 0.070 vs 0.235
    assert got["top1"] >= copied["top1"] and got["exact"] >= copied["exact"]
    cfg = yaml.safe_load((tmp_path / "d" / "train" / "config.yaml").read_text())  # the student run's own record
    assert cfg["init_adapter"] == str(adapter) and cfg["model"]["path"] == str(new_dir)
    assert cfg["transpeft"] == to_dict(TransPeftConfig())  # no Trans-PEFT perturbation
    # no config written to be read back; synthesis.json describes the synthetic set
    assert [p.name for p in (tmp_path / "d").glob("*.json")] == ["synthesis.json"]
    stats = json.loads((tmp_path / "d" / "synthesis.json").read_text())
    assert stats == result["synthesis"] and stats["asked"] == 12 and not stats["recomputed"]
    assert 0 <= stats["kept"] <= stats["generated"] <= stats["asked"] <= stats["sampled"]
    assert stats["kept"] + stats["seed_records"] == len(records) and stats["seed_records"] <= len(prompts)
    assert 0 < stats["distinct_share"] <= 1 and 0 <= stats["near_duplicate_share"] <= 1
    assert 0 <= stats["near_duplicates_of_seeds"] <= stats["kept"] and stats["mean_tokens"] > 0
    assert stats["mean_chars"] > 0 and stats["synthesis_seconds"] > 0 and stats["teacher_seconds"] > 0
    assert stats["filter_seconds"] is None  # no discriminator


def test_the_student_config_is_the_recorded_one_with_the_students_settings(tmp_path, tiny_model_dir):
    """The recorded run config (LoRA, optimiser, model, data template and lengths) under the student's new base,
    synthetic data, budget and seed; the teacher's Trans-PEFT perturbation and data source are dropped."""
    teacher = load_config(RunConfig, [{
        "model": {"path": "old", "dtype": "bfloat16", "remat": True},
        "lora": {"r": 4, "alpha": 8.0, "targets": ["q_proj", "o_proj"]},
        "transpeft": {"p_mask": 0.2, "p_drop": 0.3},
        "data": {"source": "teacher.jsonl", "template": "chat", "max_length": 96, "buckets": [48, 96],
                 "probe_prompts": 3, "seed": 7},
        "train": {"lr": 5e-4, "batch_size": 4, "max_steps": 500, "seed": 9}}])
    recorded = {**to_dict(teacher), "retired": {"by": "an older jtranspeft"}}  # an unknown section: left out
    synthetic = tmp_path / "synthetic.jsonl"
    cfg = student_config(recorded, {"path": "new"}, synthetic, tmp_path / "train", steps=20, seed=1,
                         init_adapter="moved")
    assert cfg.transpeft == TransPeftConfig() and cfg.lora == teacher.lora and cfg.peft == teacher.peft
    assert cfg.model == ModelConfig(path="new", dtype="bfloat16", remat=True)
    assert (cfg.data.source, cfg.data.format, cfg.data.seed, cfg.data.probe_prompts) == \
        (str(synthetic), "alpaca", 1, DataConfig().probe_prompts)
    assert (cfg.data.template, cfg.data.max_length, cfg.data.buckets) == ("chat", 96, (48, 96))
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps, cfg.train.seed, cfg.train.progress) == \
        (5e-4, 4, 20, 1, False)
    assert (cfg.output_dir, cfg.init_adapter) == (str(tmp_path / "train"), "moved")
    assert student_config(recorded, {"path": "new"}, synthetic, tmp_path, steps=20, seed=1, lr=1e-3).train.lr == 1e-3
    base = jt.load_base(tiny_model_dir)
    held = student_config(recorded, base_settings(base), synthetic, tmp_path, steps=20, seed=1)
    assert held.model == ModelConfig(path=str(tiny_model_dir), dtype="float32", compute_dtype=None, remat=True)
    assert base_differences(held.model, base) == [] and held.init_adapter is None


def test_synthesis_and_init_errors(pair, tiny_model_dir, tmp_path):
    adapter, new_dir, prompts = pair
    base = jt.load_base(tiny_model_dir)
    made = synthesize_prompts(base, prompts, 5, max_new_tokens=8)
    assert len(made) == len(set(made)) <= 5 and not set(made) & set(prompts)
    with pytest.raises(InputError, match="seed instruction"):
        synthesize_prompts(base, ["  "], 5)
    with pytest.raises(InputError, match="init must be"):
        distill_transfer(base, adapter, new_dir, prompts, tmp_path, init="warm")


def test_synthesis_stops_when_a_round_adds_too_few_new_prompts(pair, tiny_model_dir, caplog):
    """Greedy decoding of one identical context repeats itself: the first round yields at most one prompt,
    so the rounds stop there unless min_yield is 0 (then all max_rounds run)."""
    _, _, prompts = pair
    base = jt.load_base(tiny_model_dir)
    logger = logging.getLogger("jtranspeft.migration.distill")  # a CLI run earlier may stop propagation
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger=logger.name):
            made = synthesize_prompts(base, prompts[:1], 20, shots=1, temperature=0.0, max_new_tokens=8, max_rounds=3)
            assert len(made) <= 1 and "in 1 rounds" in caplog.text
            caplog.clear()
            synthesize_prompts(base, prompts[:1], 20, shots=1, temperature=0.0, max_new_tokens=8, max_rounds=3,
                               min_yield=0.0)
            assert "in 3 rounds" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)


def test_init_adapter_must_match_the_lora_section(pair, tmp_path, tiny_model_dir, tiny_task_file):
    adapter, _, _ = pair
    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file, train={"max_steps": 2, "grad_accum": 1})
    with pytest.raises(InputError, match="init_adapter=.*differ from the run's lora section"):
        train(load_config(RunConfig, [recipe], [f"init_adapter={adapter}", "lora.r=2"]))
    summary = train(load_config(RunConfig, [recipe], [f"init_adapter={adapter}", "lora.dropout=0.0",
                                                      "transpeft.p_mask=0", "transpeft.p_drop=0",
                                                      "train.lr=1e-12", "train.grad_clip=null"]))
    started = jt.load_peft(adapter, jt.load_base(tiny_model_dir))
    ended = jt.load_peft(summary["adapter"], jt.load_base(tiny_model_dir))
    a0, a1 = started.factors("q_proj")[1], ended.factors("q_proj")[1]
    assert float(abs(a0 - a1).max()) < 1e-6 and float(abs(a0).max()) > 1e-3  # it started from the adapter


def test_discriminator_filters_the_synthetic_prompts(tmp_path, pair, tiny_model_dir):
    from jtranspeft.migration.distill import discriminate, filter_synthetic, train_discriminator

    adapter, new_dir, prompts = pair
    old = jt.load_base(tiny_model_dir)
    # the discriminator learns its labels: "yes" (score > 0) for the real prompts, "no" for the fakes
    real, fake = prompts[:4], ["The weather report for Tuesday.", "A list of prime numbers.", "Stock prices fell.",
                               "Chapter one: the beginning."]
    directory = train_discriminator(old, real * 4, fake * 4, tmp_path / "disc", steps=60)
    scores = discriminate(old, jt.load_peft(directory, old), real + fake)
    assert all(s > 0 for s in scores[:4]) and all(s < 0 for s in scores[4:]), scores
    synthetic = [f"What colour is the {thing}?" for thing in ("cloud", "leaf")] + ["zzq blorp", "@@@ ###"]
    kept = filter_synthetic(old, prompts, synthetic, tmp_path / "f", steps=30, max_new_tokens=6)
    summary = json.loads((tmp_path / "f" / "filter.json").read_text())
    assert summary["synthetic"] == 4 and summary["kept"] == len(kept) >= 1 and set(kept) <= set(synthetic)


def _perturbed_lora(base, seed):
    """A LoRA on q, v and down with small random factors (both, so it moves the logits)."""
    lora = jt.init_lora(base, jt.LoraConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
                        jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("max_targets", [None, 4])
def test_logit_distillation_loss_equals_a_kl_computed_by_hand(tiny_model_dir, max_targets):
    """distill_loss against float64 numpy from full logits: logits = T^2 KL(teacher_T || student_T) summed over
    the target positions, mix = w CE + (1 - w) that; tokens = token_loss; on both LM-head paths (all positions,
    and only the target positions)."""
    from jtranspeft.models.perturb import FfnPerturbation
    from jtranspeft.training.config import DistillConfig
    from jtranspeft.training.step import distill_loss, token_loss
    from reference import padded_batch

    base = jt.load_base(tiny_model_dir)
    teacher_base = base.replace(params=jax.tree_util.tree_map(lambda x: x * 1.05, base.params))  # another base
    student, teacher = _perturbed_lora(base, 0), _perturbed_lora(base, 1)
    ids, mask = padded_batch(base.spec.vocab_size, lengths=(12, 9, 5))
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[0, 8:12], loss_mask[1, 5:9], loss_mask[2, 2:5] = 1, 1, 1  # at most 4 targets a row (max_targets)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}

    t, w = 2.0, 0.3
    s_logits = np.asarray(jt.apply(base, ids, student, mask), np.float64)[:, :-1]
    t_logits = np.asarray(jt.apply(teacher_base, ids, teacher, mask), np.float64)[:, :-1]
    s_log, s_log_t, t_log_t = _log_softmax(s_logits), _log_softmax(s_logits / t), _log_softmax(t_logits / t)
    targets = loss_mask[:, 1:] > 0
    kl = t * t * np.sum(np.exp(t_log_t) * (t_log_t - s_log_t), axis=-1)[targets].sum()
    ce = -np.take_along_axis(s_log, ids[:, 1:, None], axis=-1)[..., 0][targets].sum()
    count = targets.sum()

    def loss(kind):
        cfg = DistillConfig(loss=kind, temperature=t, token_weight=w, teacher_model=ModelConfig(path="teacher"),
                            teacher_adapter="teacher")
        got, n = distill_loss(base, student, (teacher_base, teacher), batch, cfg, None, FfnPerturbation(),
                              max_targets=max_targets)
        assert float(n) == count
        return float(got)

    np.testing.assert_allclose(loss("logits"), kl, rtol=2e-5)
    np.testing.assert_allclose(loss("mix"), w * ce + (1 - w) * kl, rtol=2e-5)
    assert kl > 0.05 * ce  # the two terms both matter here: a wrong KL cannot hide behind the CE
    nll, n = token_loss(base, student, batch, None, FfnPerturbation(), max_targets=max_targets)
    np.testing.assert_allclose(float(nll), ce, rtol=2e-5)
    np.testing.assert_allclose(loss("tokens"), ce, rtol=2e-5)  # the teacher is not read


def test_stored_topk_loss_is_the_kl_over_the_teachers_top_k_and_one_bucket(tiny_model_dir):
    """distill_loss from a batch carrying the teacher's top k (DistillConfig.top_k) against float64 numpy:
    T^2 [sum over the teacher's k likeliest ids of p (log p - log q) + p_rest (log p_rest - log q_rest)], p and q
    softened by T, summed over the targets; with k = vocab it is the full KL of the teacher-beside loss, and its
    gradient is finite (the empty bucket adds nothing)."""
    from jtranspeft.models.perturb import FfnPerturbation
    from jtranspeft.training.config import DistillConfig
    from jtranspeft.training.step import distill_loss, target_logits, target_positions, teacher_topk
    from reference import padded_batch

    base = jt.load_base(tiny_model_dir)
    teacher_base = base.replace(params=jax.tree_util.tree_map(lambda x: x * 1.05, base.params))
    student, teacher = _perturbed_lora(base, 0), _perturbed_lora(base, 1)
    ids, mask = padded_batch(base.spec.vocab_size, lengths=(12, 9, 5))
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[0, 8:12], loss_mask[1, 5:9], loss_mask[2, 2:5] = 1, 1, 1
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}
    t, width, vocab = 2.0, 6, base.spec.vocab_size  # width: more rows than any example's 4 targets (padding)
    s_log_t = _log_softmax(np.asarray(jt.apply(base, ids, student, mask), np.float64)[:, :-1] / t)
    t_log_t = _log_softmax(np.asarray(jt.apply(teacher_base, ids, teacher, mask), np.float64)[:, :-1] / t)
    pos, valid = (np.asarray(x) for x in target_positions(jnp.asarray(loss_mask), width))

    def by_hand(k):
        total = 0.0
        for row, col in zip(*np.nonzero(valid)):
            p, q = t_log_t[row, pos[row, col]], s_log_t[row, pos[row, col]]
            top = np.argsort(-p)[:k]
            p_rest, q_rest = 1 - np.exp(p[top]).sum(), 1 - np.exp(q[top]).sum()
            total += np.sum(np.exp(p[top]) * (p[top] - q[top]))
            total += p_rest * (np.log(p_rest) - np.log(q_rest)) if k < vocab else 0.0
        return t * t * total

    def stored_loss(k, lora=student):
        stored = teacher_topk(target_logits(teacher_base, teacher, batch, width, at_targets=True)[0], k, t)
        cfg = DistillConfig(loss="logits", temperature=t, teacher_model=ModelConfig(path="teacher"),
                            teacher_adapter="teacher", top_k=k)
        got, n = distill_loss(base, lora, None, {**batch, **stored}, cfg, None, FfnPerturbation(), max_targets=width)
        assert float(n) == valid.sum() == 11
        return got

    for k in (1, 3, vocab):
        np.testing.assert_allclose(float(stored_loss(k)), by_hand(k), rtol=1e-4)  # float32 against float64
    beside = DistillConfig(loss="logits", temperature=t, teacher_model=ModelConfig(path="t"), teacher_adapter="t")
    full, _ = distill_loss(base, student, (teacher_base, teacher), batch, beside, None, FfnPerturbation(), max_targets=4)
    np.testing.assert_allclose(float(stored_loss(vocab)), float(full), rtol=2e-5)
    assert by_hand(3) < by_hand(vocab)  # the bucket forgets how the rest is spread: less to match
    grads = jax.grad(lambda lora: stored_loss(vocab, lora))(student)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_the_teachers_top_k_are_computed_once_and_read_back(tmp_path, pair, tiny_model_dir, tiny_task_file):
    """attach_teacher_topk stores the top k with a digest of what they depend on: a second call reads them
    back (no teacher needed), another k computes them again."""
    from jtranspeft.training.finetune import TOPK_FILE, attach_teacher_topk, prepare_batches
    from jtranspeft.training.step import max_targets_of

    adapter = pair[0]
    old = jt.load_base(tiny_model_dir)
    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file)

    def run(k):
        return load_config(RunConfig, [recipe], ["distill.loss=logits", f"distill.top_k={k}",
                                                 f"distill.teacher_model.path={tiny_model_dir}",
                                                 f"distill.teacher_adapter={adapter}"])

    cfg = run(4)
    batcher = prepare_batches(cfg, old.tokenizer)[0]
    width = max_targets_of(batcher.examples)
    attach_teacher_topk(cfg, batcher.examples, (old, jt.load_peft(adapter, old)), width, batcher.pad_id)
    first = [e["teacher_logp"].copy() for e in batcher.examples]
    assert first[0].shape == (width, 4) and batcher.batch_at(0)["teacher_ids"].shape == (4, width, 4)
    stamp = (tmp_path / "run" / TOPK_FILE).stat().st_mtime_ns
    again = prepare_batches(cfg, old.tokenizer)[0]
    attach_teacher_topk(cfg, again.examples, None, width, again.pad_id)  # read back: the teacher is never asked
    assert all(np.array_equal(a["teacher_logp"], b) for a, b in zip(again.examples, first))
    assert (tmp_path / "run" / TOPK_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(TypeError):  # another k: computed again, which needs the teacher
        attach_teacher_topk(run(2), again.examples, None, width, again.pad_id)


# metrics.jsonl losses of the 4-step runs below, recorded before distill.loss existed (commit 2f4687a)
TOKEN_LOSSES_BEFORE = {"response": [12.80997085571289, 12.206829071044922, 12.610013961791992, 13.605106353759766],
                       "all": [12.942272186279297, 12.8253173828125, 12.493597984313965, 12.455814361572266]}


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_token_loss_leaves_the_numbers_as_they_were(tmp_path, tiny_model_dir, tiny_task_file, loss_on):
    """distill.loss: tokens (the default) trains exactly as before the option existed, on both LM-head paths
    (response-only targets: the head at target positions; loss_on all: everywhere)."""
    from test_train import _metrics

    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file, lora={"targets": ["q_proj", "v_proj", "down_proj"]},
                          data={"loss_on": loss_on}, train={"max_steps": 4, "warmup_steps": 1})
    train(load_config(RunConfig, [recipe], ["distill.loss=tokens", "distill.temperature=3.0"]))
    losses = [row["loss"] for row in _metrics(tmp_path / "run")]
    assert losses == pytest.approx(TOKEN_LOSSES_BEFORE[loss_on], rel=1e-5)


def test_distill_config_needs_a_teacher_and_the_student_drops_the_recorded_one(tmp_path):
    from jtranspeft.training.config import DistillConfig
    from jtranspeft.utils.config_io import ConfigError

    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(RunConfig, [{"distill": {"loss": "logits"}}])
    with pytest.raises(ConfigError, match="token_weight"):
        load_config(RunConfig, [{"distill": {"loss": "mix", "token_weight": 1.5, "teacher_adapter": "a",
                                             "teacher_model": {"path": "old"}}}])
    assert DistillConfig().weights() == (1.0, 0.0) and DistillConfig(
        loss="mix", token_weight=0.25, teacher_model=ModelConfig(), teacher_adapter="a").weights() == (0.25, 0.75)
    taught = {"loss": "logits", "temperature": 2.0, "teacher_model": {"path": "older"}, "teacher_adapter": "a0"}
    recorded = to_dict(load_config(RunConfig, [{"distill": taught}]))  # a distilled adapter distilled again
    synthetic = tmp_path / "synthetic.jsonl"
    assert student_config(recorded, {"path": "new"}, synthetic, tmp_path, steps=2, seed=0).distill == DistillConfig()
    mine = {**taught, "teacher_model": {"path": "old"}, "teacher_adapter": "a1"}
    cfg = student_config(recorded, {"path": "new"}, synthetic, tmp_path, steps=2, seed=0, distill=mine)
    assert cfg.distill == DistillConfig(loss="logits", temperature=2.0, teacher_model=ModelConfig(path="old"),
                                        teacher_adapter="a1")


def test_logit_distillation_lowers_held_out_kl_more_than_token_distillation(tmp_path, pair, tiny_model_dir):
    """The same synthetic set, data order, steps (30) and learning rate (1e-3), from the moved adapter; seeds and
    judging prompts are disjoint halves of the task's prompts. KL(teacher || student) on the held-out half,
    measured here: copy 0.254, token distillation 0.274 (worse than the copy: it fits the teacher's greedy
    tokens), logit distillation (T = 1) 0.168: 1.63x lower than tokens (T = 2: 0.150; 60 steps at lr 2e-3:
    tokens 0.794, logits 0.257, 3.1x)."""
    import shutil

    adapter, new_dir, prompts = pair
    old, new = jt.load_base(tiny_model_dir), jt.load_base(new_dir)
    teacher = jt.load_peft(adapter, old)
    seeds, held = prompts[0::2], prompts[1::2]
    probe = [alpaca_prompt(p, "") for p in held]
    kl = {"copy": fidelity(old, teacher, new, jt.load_peft(adapter, new), probe, max_new_tokens=4)["kl"]}
    for run, loss, top_k in (("tokens", "tokens", None), ("logits", "logits", None), ("top8", "logits", 8)):
        if loss == "logits":  # the teacher-answered synthetic set of the token run, not synthesized again
            (tmp_path / run).mkdir()
            shutil.copy(tmp_path / "tokens" / "synthetic.jsonl", tmp_path / run / "synthetic.jsonl")
        result = distill_transfer(old, adapter, new_dir, seeds, tmp_path / run, samples=12, steps=30, lr=1e-3,
                                  max_new_tokens=10, held_out=held, loss=loss, top_k=top_k)
        kl[run] = fidelity(old, teacher, new, jt.load_peft(result["adapter"], new), probe, max_new_tokens=4)["kl"]
    assert kl["logits"] < 0.8 * kl["tokens"] and kl["logits"] < 0.8 * kl["copy"], kl
    # the teacher's stored top 8 of 64 tokens (and a bucket) instead of the teacher in the step: measured 0.208,
    # between the two (the bucket keeps less of the teacher's distribution than all 64 tokens)
    assert kl["top8"] < 0.8 * kl["tokens"], kl
    assert (tmp_path / "top8" / "train" / "teacher_topk.npz").is_file()
    cfg = yaml.safe_load((tmp_path / "logits" / "train" / "config.yaml").read_text())
    assert cfg["distill"]["loss"] == "logits" and cfg["distill"]["teacher_adapter"] == str(adapter)
    assert cfg["distill"]["teacher_model"]["path"] == str(tiny_model_dir)
    assert yaml.safe_load((tmp_path / "tokens" / "train" / "config.yaml").read_text())["distill"]["loss"] == "tokens"


def test_a_blank_line_ends_a_synthetic_instruction_only_when_no_seed_has_one():
    """Instructions with paragraphs (a blank line inside) must not be cut at their first blank line: on SmolLM2's
    word_sequence_reversal every sample came out as its first line, "Solve the following problem.", and 1 of 250
    synthetic prompts was kept."""
    from jtranspeft.migration.distill import synthesis_stops

    assert synthesis_stops(["What is 2 + 3?", "Add 4 and 5."]) == ("\n\n", "###")
    assert synthesis_stops(["Solve the following problem.\n\nReverse this list of words: a, b", "Add 4."]) == ("###",)


def test_near_duplicate_is_word_set_jaccard_against_any_seed():
    """Lower-cased word sets: |A & B| / |A | B| >= NEAR_DUPLICATE_JACCARD (0.8) against some seed."""
    assert NEAR_DUPLICATE_JACCARD == 0.8
    seeds = ["How many legs do three cats and two ducks have?", "Spell the word apple backwards."]
    assert near_duplicate("how many LEGS do two ducks and three cats have", seeds)  # 1.0: reordered, case
    assert near_duplicate("How many legs do three cats and two geese have?", seeds)  # 9 / 11 = 0.82
    assert not near_duplicate("How many legs do three dogs and two geese have?", seeds)  # 8 / 12 = 0.67
    assert not near_duplicate("How many wheels do three cars have?", seeds)  # 4 / 11
    assert not near_duplicate("Spell the word banana backwards.", seeds)  # 4 / 6
    assert near_duplicate("Spell the word banana backwards.", seeds, threshold=0.6)
    assert not near_duplicate("", seeds) and not near_duplicate("anything", [])


def test_synthesis_stats_of_hand_made_prompts(tiny_model_dir):
    tokenizer = jt.load_base(tiny_model_dir).tokenizer
    seeds = ["Add 2 and 3.", "Name a colour."]
    stats = synthesis_stats(["add 3 and 2", "Name a fruit.", "Translate cat to French."], seeds, tokenizer)
    assert (stats["kept"], stats["near_duplicates_of_seeds"]) == (3, 1)
    assert stats["near_duplicate_share"] == pytest.approx(1 / 3) and stats["mean_chars"] == pytest.approx(16.0)
    assert stats["mean_tokens"] > 0
    assert synthesis_stats([], seeds, tokenizer)["mean_tokens"] is None


def test_a_rerun_reads_the_synthesis_record_back_or_recomputes_it(pair, tiny_model_dir, tmp_path):
    """Resuming skips synthesis: the stored record is read back; a set stored without one (an older run) gets
    one recomputed from the set, with what only the first run knew (counts asked and sampled, seconds) None."""
    adapter, new_dir, prompts = pair
    old = jt.load_base(tiny_model_dir)
    first = distill_transfer(old, adapter, new_dir, prompts, tmp_path, samples=4, steps=2, max_new_tokens=6)
    synthetic = (tmp_path / "synthetic.jsonl").read_text()
    again = distill_transfer(old, adapter, new_dir, prompts, tmp_path, samples=4, steps=2, max_new_tokens=6)
    assert again["synthesis"] == first["synthesis"] and (tmp_path / "synthetic.jsonl").read_text() == synthetic
    assert (first["synthesis"]["shots"], first["synthesis"]["synthesis_temperature"]) == (3, 0.8)
    with pytest.raises(InputError, match=r"synthesis\.json.*shots=3 \(asked: 2\)"):  # not a set of another recipe
        distill_transfer(old, adapter, new_dir, prompts, tmp_path, samples=4, steps=2, max_new_tokens=6, shots=2)
    (tmp_path / "synthesis.json").unlink()
    redone = distill_transfer(old, adapter, new_dir, prompts, tmp_path, samples=4, steps=2, max_new_tokens=6)
    assert (tmp_path / "synthetic.jsonl").read_text() == synthetic
    stats = json.loads((tmp_path / "synthesis.json").read_text())
    assert stats == redone["synthesis"] and stats["recomputed"]
    shared = ("kept", "mean_tokens", "mean_chars", "near_duplicates_of_seeds", "seed_records")
    assert {k: stats[k] for k in shared} == {k: first["synthesis"][k] for k in shared}
    assert stats["asked"] is stats["sampled"] is stats["synthesis_seconds"] is None
