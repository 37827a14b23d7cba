"""Untrusted files, end to end: hostile checkpoints through the command line, pickles never
loaded, and no network at run time. (Escaping of reports: test_report.py.)"""

from __future__ import annotations

import json
import pickle
import socket

import pytest
import torch

import irm_lens
from irm_lens.cli import main


def _rewrite_config(path, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    config = {**json.loads(meta["config"]), **changes}
    meta["config"] = json.dumps(config)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("changes, phrase", [
    ({"d_hidden": 10**12}, "d_hidden"),
    ({"n_hidden_layers": -3}, "n_hidden_layers"),
    ({"layers": list(range(10**6))}, "layer"),
    ({"read_site": "__import__('os').system('true')"}, "read_site"),
])
def test_hostile_checkpoint_is_refused_before_allocating(tiny_model, tiny_llama_dir, tmp_path,
                                                         capsys, monkeypatch, changes, phrase):
    path = irm_lens.IRM.for_model(tiny_model, layers="q1", preset="linear").save(tmp_path / "h.safetensors")
    _rewrite_config(path, **changes)
    built = []
    real_init = irm_lens.IRM.__init__
    monkeypatch.setattr(irm_lens.IRM, "__init__",
                        lambda self, *a, **k: (built.append(a), real_init(self, *a, **k))[1])
    code = main(["explain", "--model", str(tiny_llama_dir), "--device", "cpu", "--irm", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and "Traceback" not in err, err
    assert not built  # refused before any IRM (and its weights) was allocated


def test_pickled_checkpoints_are_never_unpickled(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    for name in ("irm.pt", "irm.bin", "irm.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps(Boom()))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    for name in ("irm.pt", "irm.bin", "irm.safetensors"):
        code = main(["explain", "--model", str(tiny_llama_dir), "--device", "cpu",
                     "--irm", str(tmp_path / name)])
        captured = capsys.readouterr()
        assert code == 2 and "unpickled!" not in captured.out


def test_no_network_at_run_time(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = ["--model", str(tiny_llama_dir), "--device", "cpu"]
    assert main(["generate", *model, "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert main(["info", "--model", "meta-llama/Llama-2-7b-chat-hf"]) == 2
    assert "not on this machine" in capsys.readouterr().err
    assert attempts == []
