"""Bad inputs give clear errors that name the file, field, tensor or shape; nothing loads silently."""

import json
import re

import jax
import pytest

import jtranspeft as jt
from jtranspeft.models.spec import SpecError, spec_from_hf_config
from reference import make_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_hf_model("llama_gqa_untied").save_pretrained(directory)
    return directory


def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_config_json(llama_dir, tmp_path):
    broken = _copy(llama_dir, tmp_path / "m", skip=("config.json",))
    with pytest.raises(FileNotFoundError, match="config.json"):
        jt.load_base(broken)


def test_unknown_architecture(llama_dir, tmp_path):
    broken = _copy(llama_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match="gpt_neox"):
        jt.load_base(broken)


@pytest.mark.parametrize("field, value, words", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "yarn"),
    ("hidden_act", "gelu", "hidden_act"),
    ("mlp_bias", True, "mlp_bias"),
])
def test_unsupported_config_values_name_the_field(llama_dir, field, value, words):
    config = json.loads((llama_dir / "config.json").read_text()) | {field: value}
    with pytest.raises(SpecError, match=words):
        spec_from_hf_config(config)


def test_truncated_safetensors_names_the_file(llama_dir, tmp_path):
    broken = _copy(llama_dir, tmp_path / "m")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        jt.load_base(broken)


def test_pickle_checkpoints_are_refused(llama_dir, tmp_path):
    broken = _copy(llama_dir, tmp_path / "m", skip=("model.safetensors",))
    (broken / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle"):
        jt.load_base(broken)


def test_wrong_tensor_shape_names_the_tensor(llama_dir, tmp_path):
    broken = _copy(llama_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text()) | {"intermediate_size": 100}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        jt.load_base(broken)


@pytest.fixture(scope="module")
def adapter_dir(llama_dir, tmp_path_factory):
    base = jt.load_base(llama_dir)
    lora = jt.init_lora(base, jt.LoraConfig(r=4, targets=("q_proj", "v_proj")), jax.random.key(0))
    return jt.save_peft(lora, tmp_path_factory.mktemp("adapter"), base=base)


def test_a_missing_adapter_directory_is_said_not_to_exist(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nothing'}: does not exist")):
        jt.load_peft(tmp_path / "nothing", jt.load_base(llama_dir))


def test_adapter_for_a_different_hidden_size(adapter_dir, tmp_path):
    from reference import TINY
    import transformers

    other = transformers.LlamaConfig(**{**TINY, "hidden_size": 32, "tie_word_embeddings": False})
    transformers.AutoModelForCausalLM.from_config(other).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight' has shape \[4, 64\], expected \[4, 32\]"):
        jt.load_peft(adapter_dir, jt.load_base(tmp_path / "small"))


def test_adapter_with_a_wrong_key_prefix(adapter_dir, llama_dir, tmp_path):
    from jtranspeft.checkpoints.safetensors_io import SafetensorsFile, write_safetensors

    broken = _copy(adapter_dir, tmp_path / "a")
    with SafetensorsFile(adapter_dir / "adapter_model.safetensors") as f:
        tensors = [(k.replace("base_model.model.model.", "model.model."), f.get(k)) for k in f.keys()]
    write_safetensors(broken / "adapter_model.safetensors", tensors)
    with pytest.raises(ValueError, match="outside the expected prefix"):
        jt.load_peft(broken, jt.load_base(llama_dir))


@pytest.mark.parametrize("field, value", [("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]),
                                          ("target_modules", ["q_proj", "lm_head"])])
def test_adapter_features_we_cannot_honour(adapter_dir, llama_dir, tmp_path, field, value):
    broken = _copy(adapter_dir, tmp_path / "a")
    config = json.loads((broken / "adapter_config.json").read_text()) | {field: value}
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        jt.load_peft(broken, jt.load_base(llama_dir))
