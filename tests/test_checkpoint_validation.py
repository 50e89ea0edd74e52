"""load_pretrained on a broken or hostile Hugging Face folder: a ValueError that names the field, file or
tensor, never a silent wrong model, a raw TypeError/RuntimeError or a file read from outside the folder."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import Llama, ModelConfig, load_pretrained, save_pretrained

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=16, eos_token_id=0)


def make_checkpoint(path, **config):
    """A random tiny model saved in the HF layout (config.json + model.safetensors, float32) at ``path``."""
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Llama(ModelConfig(**(SMALL | config)))
    save_pretrained(model, path, dtype=torch.float32)
    return path


def edit_config(path, **changes):
    """Rewrite config.json with ``changes`` (a value of ``...`` deletes the key)."""
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not ...}
    (path / "config.json").write_text(json.dumps(config))  # NaN and Infinity are written as JSON's extensions


def load(path):
    return load_pretrained(path, dtype=torch.float32, device="cpu")


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "model")


def shard(path):
    """Split model.safetensors into two shards plus model.safetensors.index.json; returns the weight map."""
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(path / file))
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    write_index(path, weight_map)
    return weight_map


def write_index(path, weight_map):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---------------------------------------------------------------- the good case still loads
def test_a_valid_checkpoint_loads_sharded_or_not(ckpt):
    want = load(ckpt).state_dict()
    shard(ckpt)
    got = load(ckpt).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- config.json: types
@pytest.mark.parametrize("field, value", [
    ("hidden_size", "1024"),          # a string where an int is required
    ("num_hidden_layers", 2.0),       # a float where an int is required
    ("num_attention_heads", True),    # a bool is not an int here
    ("vocab_size", None),
    ("max_position_embeddings", math.nan),
    ("rms_norm_eps", "1e-5"),
    ("rope_theta", True),
    ("tie_word_embeddings", "false"),  # a string "false" would be truthy
    ("attention_bias", 1),
    ("eos_token_id", 1.5),
    ("head_dim", "8"),
])
def test_config_field_of_wrong_type_is_named(ckpt, field, value):
    edit_config(ckpt, **{field: value})
    with pytest.raises(ValueError, match=rf"config\.json(.|\n)*{field}"):
        load(ckpt)


def test_int_rope_theta_is_accepted(ckpt):
    edit_config(ckpt, rope_theta=10000, rope_parameters=...)  # real configs write it as an int too
    assert load(ckpt).config.rope_theta == 10000.0


# ---------------------------------------------------------------- config.json: ranges
@pytest.mark.parametrize("field, value", [
    ("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-6), ("rms_norm_eps", math.nan), ("rms_norm_eps", math.inf),
    ("rope_theta", 0.0), ("rope_theta", -10000.0), ("rope_theta", math.nan),
    ("num_hidden_layers", 0), ("intermediate_size", -24), ("vocab_size", 0), ("max_position_embeddings", 0),
    ("eos_token_id", 32), ("eos_token_id", -1), ("bos_token_id", 99),   # token ids outside the vocabulary
])
def test_config_field_out_of_range_is_named(ckpt, field, value):
    edit_config(ckpt, **{field: value})
    with pytest.raises(ValueError, match=rf"config\.json(.|\n)*{field}"):
        load(ckpt)


def test_heads_must_divide_by_kv_heads(ckpt):
    edit_config(ckpt, num_key_value_heads=3, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*num_key_value_heads"):
        load(ckpt)


def test_hidden_size_must_divide_by_heads_when_head_dim_is_implied(ckpt):
    edit_config(ckpt, head_dim=..., hidden_size=18, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*hidden_size \(18\).*num_attention_heads \(4\)"):
        load(ckpt)


def test_explicit_head_dim_need_not_divide_hidden_size():
    config = ModelConfig.from_dict(SMALL | dict(hidden_size=18, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=8))
    assert config.head_dim == 8


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "max_position_embeddings"])
def test_missing_size_field_is_named(ckpt, field):
    """The course's own defaults (E=256, ...) are no stand-in for a size a Hugging Face config left out."""
    edit_config(ckpt, **{field: ...})
    with pytest.raises(ValueError, match=rf"config\.json(.|\n)*{field}"):
        load(ckpt)


def test_missing_num_key_value_heads_means_multi_head_attention(tmp_path):
    """Hugging Face's rule (older LLaMA configs have no num_key_value_heads): Hkv = Hq."""
    path = make_checkpoint(tmp_path / "mha", num_attention_heads=2, num_key_value_heads=2)
    edit_config(path, num_key_value_heads=...)
    assert load(path).config.num_key_value_heads == 2


@pytest.mark.parametrize("text", ["{", "", '{"hidden_size": 16,}', "[1, 2]", "\xff"])
def test_invalid_config_json_names_the_file(ckpt, text):
    (ckpt / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(ValueError, match=r"config\.json"):
        load(ckpt)


# ---------------------------------------------------------------- config.json: what the course model does not do
@pytest.mark.parametrize("act", ["gelu", "relu", 5])
def test_unsupported_hidden_act_is_refused(ckpt, act):
    edit_config(ckpt, hidden_act=act)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*hidden_act"):
        load(ckpt)


def test_mlp_bias_is_refused(ckpt):
    edit_config(ckpt, mlp_bias=True)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*mlp_bias"):
        load(ckpt)


@pytest.fixture
def qwen2(tmp_path):
    path = make_checkpoint(tmp_path / "qwen2", attention_bias=True)
    edit_config(path, model_type="qwen2", architectures=["Qwen2ForCausalLM"], sliding_window=8,
                use_sliding_window=False, max_window_layers=0)
    return path


@pytest.mark.parametrize("changes", [
    dict(use_sliding_window=True),                                       # layers 0.. use an 8-token window
    dict(use_sliding_window=True, max_window_layers=1),                  # layer 1 does
    dict(use_sliding_window=True, max_window_layers=2,
         layer_types=["full_attention", "sliding_attention"]),           # layer_types (transformers >= 4.53) decide
])
def test_qwen2_sliding_window_in_use_is_refused(qwen2, changes):
    edit_config(qwen2, **changes)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*sliding_window=8"):
        load(qwen2)


@pytest.mark.parametrize("changes", [
    dict(),                                                   # use_sliding_window false: the window is off
    dict(use_sliding_window=True, max_window_layers=2),       # every layer below max_window_layers: full attention
    dict(use_sliding_window=True, sliding_window=16),         # a window as long as the context masks nothing
    dict(use_sliding_window=True, sliding_window=None),
])
def test_qwen2_sliding_window_not_in_use_loads(qwen2, changes):
    edit_config(qwen2, **changes)
    assert load(qwen2).config.attention_bias


def test_mistral_sliding_window_is_refused_unless_it_covers_the_context(ckpt):
    edit_config(ckpt, model_type="mistral", sliding_window=8)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*sliding_window=8"):
        load(ckpt)
    for window in (None, 16, 4096):
        edit_config(ckpt, sliding_window=window)
        load(ckpt)


def test_sliding_window_of_wrong_type_is_named(ckpt):
    edit_config(ckpt, model_type="mistral", sliding_window="8")
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*sliding_window"):
        load(ckpt)


# ---------------------------------------------------------------- tied embeddings
def test_tied_config_with_its_own_lm_head_is_refused(tmp_path):
    path = make_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    state = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in state
    save_file(state | {"lm_head.weight": torch.randn(32, 16)}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tie_word_embeddings(.|\n)*lm_head\.weight"):
        load(path)


def test_tied_config_with_an_identical_lm_head_copy_loads(tmp_path):
    """Not ambiguous: the copy is the embedding itself (some exporters write both)."""
    path = make_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    state = load_file(str(path / "model.safetensors"))
    save_file(state | {"lm_head.weight": state["model.embed_tokens.weight"].clone()}, str(path / "model.safetensors"))
    model = load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------- shards
@pytest.mark.parametrize("bad", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_shard_path_leaving_the_folder_is_refused(ckpt, bad):
    outside = ckpt.parent / "outside.safetensors"
    weight_map = shard(ckpt)
    first = next(iter(weight_map.values()))
    (ckpt / first).rename(outside)           # a valid shard, but outside the checkpoint folder
    bad = str(outside) if bad == "ABSOLUTE" else bad
    write_index(ckpt, {k: bad if v == first else v for k, v in weight_map.items()})
    with pytest.raises(ValueError, match=rf"model\.safetensors\.index\.json(.|\n)*{bad.replace('.', '[.]')}"):
        load(ckpt)


@pytest.mark.parametrize("sharded", [False, True])
def test_symlink_pointing_outside_the_folder_is_refused(ckpt, sharded):
    name = next(iter(shard(ckpt).values())) if sharded else "model.safetensors"
    outside = ckpt.parent / "elsewhere.safetensors"
    (ckpt / name).rename(outside)
    os.symlink(outside, ckpt / name)
    with pytest.raises(ValueError, match=rf"{name}(.|\n)*outside"):
        load(ckpt)


def test_hub_cache_snapshot_with_symlinks_into_blobs_loads(tmp_path, monkeypatch):
    """huggingface_hub's cache: snapshots/<rev>/model.safetensors -> ../../blobs/<sha>; that is one repository."""
    repo = tmp_path / "models--course--tiny"
    snapshot = make_checkpoint(repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    (snapshot / "model.safetensors").rename(repo / "blobs" / "f00d")
    os.symlink("../../blobs/f00d", snapshot / "model.safetensors")
    load(snapshot)
    monkeypatch.chdir(snapshot)
    load(".")                               # the same folder named relatively


def test_missing_shard_is_named(ckpt):
    weight_map = shard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors"):
        load(ckpt)
    assert weight_map


@pytest.mark.parametrize("index", ["{", '{"metadata": {}}', '{"weight_map": ["a"]}', '{"weight_map": {"x": 5}}'])
def test_invalid_index_names_the_file(ckpt, index):
    shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        load(ckpt)


def test_corrupt_shard_is_named(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load(ckpt)


def test_missing_tensor_is_named(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load(ckpt)


def test_tensor_in_two_shards_is_refused(ckpt):
    """Which copy would win depended on the order of the files: refuse instead of guessing."""
    shard(ckpt)
    first = load_file(str(ckpt / "model-00001-of-00002.safetensors"))
    name = next(iter(first))
    second = load_file(str(ckpt / "model-00002-of-00002.safetensors"))
    save_file(second | {name: torch.zeros_like(first[name])}, str(ckpt / "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match=rf"{name}(.|\n)*model-00001-of-00002(.|\n)*model-00002-of-00002"):
        load(ckpt)


def test_tensor_of_wrong_shape_is_named_with_both_shapes(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.randn(16, 16)   # config: Hkv*D = 8 rows
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError,
                       match=r"model\.layers\.0\.self_attn\.k_proj\.weight(.|\n)*\[16, 16\](.|\n)*\[8, 16\]"):
        load(ckpt)


def test_tensor_of_integer_dtype_is_named(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(16, dtype=torch.int32)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight(.|\n)*int32"):
        load(ckpt)


@pytest.mark.parametrize("dtype", [torch.int8, "float16"])
def test_dtype_argument_must_be_a_floating_torch_dtype(ckpt, dtype):
    with pytest.raises(ValueError, match="dtype"):
        load_pretrained(ckpt, dtype=dtype, device="cpu")


# ---------------------------------------------------------------- model families: Llama-3.x RoPE scaling, Qwen3
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8)


@pytest.fixture
def llama3(tmp_path):
    return make_checkpoint(tmp_path / "llama3", rope_scaling=LLAMA3, rope_theta=500000.0)


def test_llama3_scaling_written_both_ways_and_read_from_either(llama3):
    """save_pretrained writes rope_parameters (transformers >= 5) and rope_theta + rope_scaling (older, and
    Llama-3.2's own config.json); each alone reads back the same config."""
    written = json.loads((llama3 / "config.json").read_text())
    assert written["rope_parameters"] == LLAMA3 | {"rope_theta": 500000.0}
    assert written["rope_scaling"] == LLAMA3 and written["rope_theta"] == 500000.0
    want = load(llama3).config
    assert want.rope_scaling.rope_type == "llama3" and want.rope_scaling.original_max_position_embeddings == 8
    edit_config(llama3, rope_scaling=...)                           # transformers 5's way only
    assert load(llama3).config == want
    edit_config(llama3, rope_scaling=LLAMA3, rope_parameters=...)  # the older way only
    assert load(llama3).config == want
    edit_config(llama3, rope_scaling=LLAMA3 | {"type": "llama3"})  # configs of transformers < 4.45 said "type"
    assert load(llama3).config == want


def test_llama3_scaling_without_original_context_uses_max_position_embeddings(llama3):
    """transformers' fallback when original_max_position_embeddings is missing."""
    edit_config(llama3, rope_scaling=..., rope_parameters={k: v for k, v in LLAMA3.items()
                                                           if k != "original_max_position_embeddings"})
    assert load(llama3).config.rope_scaling.original_max_position_embeddings == 16


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope", [
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
    dict(rope_type="dynamic", factor=2.0),
    dict(rope_type="longrope", short_factor=[1.0], long_factor=[2.0]),
    dict(type="su", factor=2.0),
])
def test_unsupported_rope_type_is_refused(ckpt, key, rope):
    edit_config(ckpt, **{"rope_parameters": ..., key: rope})
    with pytest.raises(ValueError, match=rf"config\.json(.|\n)*rope_type '{rope.get('rope_type', rope.get('type'))}'"):
        load(ckpt)


@pytest.mark.parametrize("changes, field", [
    (dict(factor=0.5), "factor"), (dict(factor="8"), "factor"), (dict(factor=math.nan), "factor"),
    (dict(low_freq_factor=None), "low_freq_factor"), (dict(low_freq_factor=-1.0), "low_freq_factor"),
    (dict(high_freq_factor=1.0), "high_freq_factor"),           # not above low_freq_factor: the blend divides by 0
    (dict(original_max_position_embeddings=8.5), "original_max_position_embeddings"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_bad_llama3_scaling_field_is_named(llama3, changes, field):
    edit_config(llama3, rope_scaling=..., rope_parameters=LLAMA3 | changes)
    with pytest.raises(ValueError, match=rf"config\.json(.|\n)*{field}"):
        load(llama3)


@pytest.mark.parametrize("changes", [
    dict(rope_scaling=LLAMA3 | {"factor": 4.0}),                           # two scalings
    dict(rope_theta=10000.0),                                              # two thetas
    dict(rope_scaling=None, rope_parameters=dict(rope_type="default", rope_theta=1e4), rope_theta=5e5),
])
def test_rope_settings_given_twice_must_agree(llama3, changes):
    """transformers 5 would silently pick one (rope_scaling, the dict's theta): refuse to guess."""
    edit_config(llama3, **changes)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*(disagree|rope_theta is given more than once)"):
        load(llama3)


def test_linear_rope_scaling_loads(ckpt):
    edit_config(ckpt, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4))
    assert load(ckpt).config.rope_scaling.factor == 4.0


def test_rope_parameters_per_layer_type_are_refused(ckpt):
    edit_config(ckpt, rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1e4),
                                           sliding_attention=dict(rope_type="default", rope_theta=1e4)))
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*rope_parameters per layer type"):
        load(ckpt)


@pytest.fixture
def qwen3(tmp_path):
    return make_checkpoint(tmp_path / "qwen3", qk_norm=True, head_dim=16)


def test_qwen3_checkpoint_is_written_and_read_as_qwen3(qwen3):
    written = json.loads((qwen3 / "config.json").read_text())
    assert written["model_type"] == "qwen3" and written["head_dim"] == 16 and "qk_norm" not in written
    model = load(qwen3)
    assert model.config.qk_norm and model.config.head_dim == 16 != 16 // 2
    assert model.model.layers[1].self_attn.k_norm.weight.shape == (16,)


def test_qwen3_without_head_dim_has_transformers_default_of_128(qwen3):
    edit_config(qwen3, head_dim=...)
    assert ModelConfig.from_json(qwen3 / "config.json").head_dim == 128   # Qwen3Config's, not E / Hq = 8


def test_qwen3_missing_q_norm_is_named(qwen3):
    state = load_file(str(qwen3 / "model.safetensors"))
    del state["model.layers.0.self_attn.q_norm.weight"]
    save_file(state, str(qwen3 / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing(.|\n)*model\.layers\.0\.self_attn\.q_norm\.weight"):
        load(qwen3)


def test_a_llama_checkpoint_with_q_norm_tensors_is_refused(qwen3):
    """model_type decides the family: q_norm tensors under a llama config.json are not silently dropped."""
    edit_config(qwen3, model_type="llama")
    with pytest.raises(ValueError, match=r"unexpected(.|\n)*q_norm"):
        load(qwen3)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_attention_bias_with_an_o_proj_bias_is_refused(ckpt, model_type):
    """LLaMA's and Qwen3's attention_bias also biases o_proj; the course model has q/k/v biases only (Qwen2's)."""
    edit_config(ckpt, model_type=model_type, attention_bias=True)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*attention_bias true(.|\n)*o_proj"):
        load(ckpt)


def test_qwen3_sliding_window_in_use_is_refused(qwen3):
    edit_config(qwen3, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match=r"config\.json(.|\n)*sliding_window=8"):
        load(qwen3)
    edit_config(qwen3, use_sliding_window=False)
    assert load(qwen3).config.qk_norm


@pytest.mark.parametrize("rope_scaling", [dict(rope_type="llama3", factor=8.0), dict(rope_type="linear", factor=2.0,
                                                                                   extra=1), "linear", 5])
def test_model_config_rope_scaling_is_validated(rope_scaling):
    with pytest.raises(ValueError, match="rope"):
        ModelConfig(**SMALL, rope_scaling=rope_scaling)


def test_model_config_qk_norm_must_be_a_bool():
    with pytest.raises(ValueError, match="qk_norm"):
        ModelConfig(**SMALL, qk_norm=1)
