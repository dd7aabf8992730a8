"""config.json as a user hands it over: bad files are refused naming the file and the key; every key that changes
the numerics is honoured as transformers honours it (family defaults included) or refused by name; the rest is
listed in one warning."""

import json
import warnings

import pytest
import torch
import transformers

from minillm import CausalLM, ModelConfig
from parity import model as pm

BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4}


def _write(tmp_path, content) -> str:
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# (what the file holds, a fragment the error must contain: the key, or what is wrong)
BAD = [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"llama"', "expected a JSON object, got str"),
    ("{nope", "not valid JSON"),
    ({"vocab_size": 100}, "model_type None"),
    ({**BASE, "model_type": "gpt2"}, "model_type 'gpt2'"),
    ({k: v for k, v in BASE.items() if k != "hidden_size"}, "'hidden_size' is missing"),
    ({**BASE, "hidden_size": "32"}, "'hidden_size' must be an integer"),
    ({**BASE, "hidden_size": 32.0}, "'hidden_size' must be an integer"),
    ({**BASE, "vocab_size": True}, "'vocab_size' must be an integer"),
    ({**BASE, "hidden_size": 0}, "hidden_size must be a positive integer"),
    ({**BASE, "num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
    ({**BASE, "intermediate_size": 0}, "intermediate_size must be a positive integer"),
    ({**BASE, "num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({**BASE, "num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    ({**BASE, "head_dim": -8}, "head_dim must be a positive integer"),
    ({**BASE, "max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ({**BASE, "num_attention_heads": 5}, "hidden_size 32 is not divisible by num_attention_heads 5"),
    ({**BASE, "num_key_value_heads": 3}, "num_key_value_heads 3"),
    ({**BASE, "head_dim": 7}, "head_dim 7 must be even"),
    ({**BASE, "rms_norm_eps": "1e-6"}, "'rms_norm_eps' must be a number"),
    ({**BASE, "rms_norm_eps": -1e-6}, "rms_norm_eps must be a positive number"),
    ({**BASE, "tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false"),
    ({**BASE, "attention_bias": 1}, "'attention_bias' must be true or false"),
    ({**BASE, "eos_token_id": "2"}, "'eos_token_id' must be an integer"),
    ({**BASE, "pad_token_id": 100}, "pad_token_id 100 is outside the vocabulary"),
    ({**BASE, "eos_token_id": [2, "3"]}, "'eos_token_id' must be an integer"),
    ({**BASE, "dtype": "float8"}, "key 'dtype': unknown dtype name \"float8\""),
    ({**BASE, "torch_dtype": "fp32"}, "key 'torch_dtype': unknown dtype name \"fp32\""),
    ({**BASE, "hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not supported"),
    ({**BASE, "hidden_act": 3}, "'hidden_act' must be a string"),
    ({**BASE, "attention_dropout": 1.5}, "attention_dropout must be a probability"),
    ({**BASE, "rope_parameters": [1]}, "'rope_parameters' must be a JSON object"),
    ({**BASE, "rope_theta": 0}, "'rope_theta' must be a positive number"),
    ({**BASE, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope type 'longrope' is not supported"),
    ({**BASE, "rope_scaling": {"rope_type": "linear"}}, "needs ['factor']"),
    ({**BASE, "rope_scaling": {"rope_type": "linear", "factor": "2"}}, "key 'factor' must be a number"),
    ({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": "no"}}, "'truncate' must be true or false"),
    ({**BASE, "partial_rotary_factor": 0.5}, "'partial_rotary_factor' = 0.5"),
    ({**BASE, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}, "partial_rotary_factor"),
    ({**BASE, "is_causal": False}, "'is_causal' = false"),
    ({**BASE, "quantization_config": {"quant_method": "gptq"}}, "'quantization_config'"),
    ({**BASE, "model_type": "qwen2", "num_key_value_heads": 4, "use_sliding_window": True, "max_window_layers": 0},
     "use_sliding_window=true with max_window_layers 0"),
    ({**BASE, "model_type": "qwen3", "head_dim": 8, "num_key_value_heads": 4, "layer_types": ["sliding_attention"]},
     "'layer_types' holds ['sliding_attention']"),
    ({**BASE, "model_type": "qwen2", "num_key_value_heads": 4, "use_sliding_window": True, "max_window_layers": "x"},
     "'max_window_layers' must be an integer"),
    ({**BASE, "model_type": "qwen3", "head_dim": None}, "'head_dim' is null"),
]


@pytest.mark.parametrize("content,fragment", BAD, ids=[f[1][:40] for f in BAD])
def test_bad_config_json_names_the_file_and_the_key(tmp_path, content, fragment):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf(tmp_path)
    assert str(e.value).startswith(path + ":"), e.value
    assert fragment in str(e.value), e.value


def test_not_utf8_is_a_sentence(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_absent_keys_take_the_family_defaults_of_transformers(model_type):
    """Qwen2/3 default to 32 kv heads and Qwen3 to head_dim 128 when config.json leaves them out."""
    d = {**BASE, "model_type": model_type, "num_attention_heads": 32, "hidden_size": 64}
    ours = ModelConfig.from_hf(d)
    theirs = transformers.AutoConfig.for_model(**d)
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                "attention_dropout", "tie_word_embeddings", "initializer_range"):
        assert getattr(ours, key) == getattr(theirs, key, None) or (key == "head_dim" and model_type == "qwen2"
                                                                      and ours.head_dim == 64 // 32), key
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]


def _logits_equal_transformers(d: dict, T: int = 20) -> None:
    cfg = ModelConfig.from_hf(d)
    ours = pm.random_model(cfg, 0).eval()
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(1, cfg.vocab_size, (1, T))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_yarn_without_factor_is_derived_as_transformers_does(tmp_path):
    rope = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4}
    d = {**BASE, "max_position_embeddings": 16, "rope_parameters": rope}
    _logits_equal_transformers(d)
    # the key left out entirely (transformers raises KeyError): the same derived factor
    absent = ModelConfig.from_hf({**d, "rope_parameters": {k: v for k, v in rope.items() if k != "factor"}})
    assert absent == ModelConfig.from_hf(d)
    # and written back so transformers derives it too
    assert absent.to_hf()["rope_parameters"]["factor"] is None


@pytest.mark.parametrize("act", ["silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"])
def test_hidden_act_is_honoured(act):
    _logits_equal_transformers({**BASE, "hidden_act": act}, T=6)


def test_attention_dropout_from_config_json():
    cfg = ModelConfig.from_hf({**BASE, "attention_dropout": 0.25})
    assert cfg.attention_dropout == 0.25 and cfg.to_hf()["attention_dropout"] == 0.25
    m = CausalLM(cfg).train()
    assert all(layer.self_attn.attention_dropout == 0.25 for layer in m.model.layers)


def test_keys_that_change_nothing_are_listed_in_one_warning():
    d = {**BASE, "model_type": "qwen2", "num_key_value_heads": 4, "foo": 1, "pretraining_tp": 2, "mlp_bias": True,
         "attention_bias": True, "final_logit_softcapping": 30.0,
         "rope_parameters": {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = ModelConfig.from_hf(d)
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    for key in ("foo", "pretraining_tp", "mlp_bias", "attention_bias", "final_logit_softcapping",
                "rope_parameters.original_max_position_embeddings"):
        assert key in msg, (key, msg)
    assert not cfg.mlp_bias and cfg.qkv_bias and not cfg.o_bias  # Qwen2's hard-coded biases, whatever the file says
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_configs_written_by_either_side_load_without_warnings(tmp_path, model_type):
    cfg = ModelConfig.preset("tiny", model_type=model_type, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_hf(tmp_path) == cfg
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_qwen_sliding_window_that_slides_no_layer_is_accepted():
    """use_sliding_window with max_window_layers >= num_hidden_layers: every layer is full attention."""
    d = {**BASE, "model_type": "qwen2", "num_key_value_heads": 4, "use_sliding_window": True, "sliding_window": 4,
         "max_window_layers": 1}
    _logits_equal_transformers(d, T=10)
