"""Bad input, end to end through the command line: each gets one specific `irm-lens: error:`
line (no traceback), exit status 2, and nothing written where the output was to go.

The same errors are raised by the Python API; the component tests (test_models, test_irm,
test_dataset, test_analysis_model, ...) check their types and messages one by one.
"""

from __future__ import annotations

import pytest
import torch

import irm_lens
from irm_lens.cli import main


@pytest.fixture(scope="module")
def files(tiny_llama_dir, tmp_path_factory):
    """Every kind of bad file, made once."""
    from transformers import GPT2Config

    d = tmp_path_factory.mktemp("bad")
    model = irm_lens.load_model(tiny_llama_dir, device="cpu")
    good = irm_lens.IRM.for_model(model, layers="q1", preset="linear").save(d / "good.safetensors")
    data = good.read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "corrupted.safetensors").write_bytes(b"\xff" * 16 + data[16:])
    other = irm_lens.IRMConfig(d_model=32, n_layers=4, layers=(0,), d_hidden=32, n_hidden_layers=0)
    irm_lens.IRM(other).save(d / "other_shape.safetensors")
    (d / "empty.csv").write_text("text\n")
    (d / "no_text_column.csv").write_text("words\nhello there\n")
    (d / "ok.csv").write_text("text\n" + "\n".join(f"row {i} of some text" for i in range(40)))
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(d / "gpt2")
    (d / "a_file").write_text("not a directory")
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    save_file({"weight": torch.zeros(2)}, str(d / "foreign.safetensors"))
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=260, attention_bias=True).save_pretrained(d / "biased")
    (d / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    (d / "run_without_json").mkdir()
    return d


CASES = {
    "neuron out of range": (["explain", "--neuron", "1512"], "d_model=64"),
    "layer outside the model": (["train", "--data", "{d}/ok.csv", "--layers", "9"], "outside"),
    "IRM of another shape": (["explain", "--irm", "{d}/other_shape.safetensors"], "d_model=32"),
    "truncated checkpoint": (["explain", "--irm", "{d}/truncated.safetensors"], "safetensors"),
    "corrupted checkpoint": (["explain", "--irm", "{d}/corrupted.safetensors"], "safetensors"),
    "empty dataset": (["train", "--data", "{d}/empty.csv"], "empty"),
    "no text column": (["train", "--data", "{d}/no_text_column.csv"], "text"),
    "texts longer than the limit": (["train", "--data", "{d}/ok.csv", "--chat",
                                     "--max-length", "4"], "max_length=4"),
    "non-Llama model": (["info", "--model", "{d}/gpt2"], "gpt2"),
    "unknown name offline": (["info", "--model", "nobody/no-such-model"], "no-such-model"),
    "hub request offline": (["info", "--model", "meta-llama/Llama-2-7b-chat-hf"], "offline"),
    "unwritable output": (["generate", "--prompt", "Hi", "--max-new-tokens", "2",
                           "--out", "{d}/a_file/gen.json"], "a_file"),
    "foreign checkpoint": (["explain", "--irm", "{d}/foreign.safetensors"],
                           "not an irm_lens IRM checkpoint"),
    "missing checkpoint": (["explain", "--irm", "{d}/nothing.safetensors"], "No IRM checkpoint"),
    "Llama with biases": (["info", "--model", "{d}/biased"], "attention_bias"),
    "corrupt GGUF": (["info", "--model", "{d}/broken.gguf"], "not a GGUF"),
    "run directory without run.json": (["report", "--run", "{d}/run_without_json",
                                        "--out", "{d}/r.html"], "No IRM checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_specific_error_line(case, files, tiny_llama_dir, tmp_path, capsys,
                                                monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, phrase = CASES[case]
    args = [a.format(d=files) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_llama_dir)]
    if args[0] == "train":
        args += ["--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "run")]
    code = main([*args, "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("irm-lens: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert phrase.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "run" / "irm.safetensors").exists()


def test_non_finite_training_stops_and_says_so_through_the_api(tiny_model):
    """NaN in training: the one bad input the command line cannot produce (see test_train)."""
    irm = irm_lens.IRM.for_model(tiny_model, layers="q1", preset="linear")
    with torch.no_grad():
        irm.out.bias.fill_(float("nan"))
    config = irm_lens.TrainConfig(max_steps=2, batch_size=4, max_length=16, eval_every=1,
                                  max_val_batches=1)
    texts = [f"text number {i}" for i in range(40)]
    result = irm_lens.train(tiny_model, irm, texts, config, progress=False)
    assert "non-finite" in result.stop_reason.lower()
