"""Shared fixtures: tiny random Llama-architecture models, and the embedded model.

Unit tests use tiny models built here (random weights, a byte-level tokenizer), so they run in
seconds and need nothing but the installed packages. Integration tests use the embedded
SmolLM2-135M-Instruct, loaded once per session through the on-disk conversion cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Screenshots and pages the browser tests keep for people to look at (test-artifacts/, or
# IRM_LENS_TEST_ARTIFACTS).
ARTIFACTS = Path(os.environ.get("IRM_LENS_TEST_ARTIFACTS",
                                Path(__file__).parents[1] / "test-artifacts"))

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    tie_word_embeddings=False,
)


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens plus 4 specials (``irm_lens.models``)."""
    from irm_lens.models import byte_level_tokenizer

    return byte_level_tokenizer()


def save_tiny_llama(directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a random LlamaForCausalLM (+ tokenizer) as a local checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "vocab_size": len(tokenizer), **overrides})
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # RMSNorm weights start at 1; make them informative
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir):
    import irm_lens

    return irm_lens.load_model(tiny_llama_dir, device="cpu")


# A minimal chat template: "<user>Q?<assistant>" (a system turn, when given: "<system>..."),
# and an assistant turn ends with the EOS token: "<assistant>A.</s>".
ROLE_TAG_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def chat_model(tiny_model):
    """``tiny_model`` with :data:`ROLE_TAG_TEMPLATE` as its chat template, for one test."""
    tiny_model.tokenizer.chat_template = ROLE_TAG_TEMPLATE
    try:
        yield tiny_model
    finally:
        tiny_model.tokenizer.chat_template = None


@pytest.fixture(scope="session")
def embedded_model():
    import irm_lens

    return irm_lens.load_model(device="cpu")


# Helpers shared by the analysis tests (imported as ``from conftest import ...``).
PROMPTS = ["The cat sat on the mat.", "Numbers: 1, 2, 3.", "Hello there, friend!"]


def planted_irm(model, neuron: int, layers="all", value: float = 3.0):
    """A linear IRM whose output is the constant ``value`` at ``neuron`` on every layer (and a
    smaller constant elsewhere on layer 0)."""
    import irm_lens

    irm = irm_lens.IRM.for_model(model, layers=layers, preset="linear", zero_init_output=True)
    bias = torch.zeros(irm.config.n_injected, irm.config.d_model)
    bias[:, neuron] = value
    bias[0, (neuron + 1) % irm.config.d_model] = value / 3
    with torch.no_grad():
        irm.out.bias.copy_(bias.flatten())
    return irm


def chromium_driver():
    """Headless Chromium with the network cut off; skipped when absent, except under CI=true."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        why = ("Headless Chromium is not installed (Debian: apt-get install chromium "
               "chromium-driver; scripts/install.sh does it when run as root).")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why} Under CI=true the browser tests may not be skipped.")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,2000", "--host-resolver-rules=MAP * ~NOTFOUND",
                "--proxy-server=http://127.0.0.1:9"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_network_conditions(offline=True, latency=0, download_throughput=0,
                                  upload_throughput=0)
    return driver


DRAWN_FIGURES_JS = (
    "return [...document.querySelectorAll('div.js-plotly-plot')]"
    ".filter(d => d.querySelector('svg.main-svg')"
    " && d.querySelectorAll('g.trace, image').length > 0).length")  # figures with data drawn
