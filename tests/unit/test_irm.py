"""IRMConfig validation, layer sets, and the safetensors save / load round trip."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import irm_lens
from irm_lens import IRM, CheckpointError, ConfigError, IRMConfig, ShapeMismatchError, layer_set


def test_layer_set_presets_match_the_paper_on_llama2_depth():
    assert layer_set("all", 32) == tuple(range(32))
    assert layer_set("q1", 32) == tuple(range(0, 8))
    assert layer_set("q4", 32) == tuple(range(24, 32))
    assert layer_set("every4", 32) == (3, 7, 11, 15, 19, 23, 27, 31)


def test_layer_set_quarters_partition_any_depth():
    for n in (1, 4, 7, 30, 33):
        quarters = [layer for q in range(1, 5) for layer in _maybe(f"q{q}", n)]
        assert quarters == list(range(n))


def _maybe(spec, n):
    try:
        return layer_set(spec, n)
    except ConfigError:  # a quarter of a 1-layer model is empty
        return ()


def test_layer_set_forms():
    assert layer_set("2-4", 10) == (2, 3, 4)
    assert layer_set("7, 3,3", 10) == (3, 7)
    assert layer_set(5, 10) == (5,)
    assert layer_set(range(0, 10, 3), 10) == (0, 3, 6, 9)
    assert layer_set("every1", 3) == (0, 1, 2)


@pytest.mark.parametrize("spec", ["q5", "every0", "9-12", [0, 10], [1.5], "middle", [], [True]])
def test_layer_set_refuses_bad_specs(spec):
    with pytest.raises(ConfigError) as err:
        layer_set(spec, 10)
    assert str(err.value)


def test_layer_outside_model_names_the_valid_range():
    with pytest.raises(ConfigError, match=r"valid layers are 0\.\.9"):
        layer_set([12], 10)


def _config(**kw):
    base = dict(d_model=16, n_layers=4, layers=(0, 2), d_hidden=8, n_hidden_layers=2)
    return IRMConfig(**{**base, **kw})


def test_config_defaults_follow_the_paper():
    cfg = IRMConfig(d_model=16, n_layers=4, layers=(0, 1, 2, 3))
    assert cfg.read_site == "blocks.0.hook_resid_mid"
    assert cfg.inject_site == "resid_post"
    assert cfg.d_hidden == 48 and cfg.n_hidden_layers == 4
    irm = IRM(cfg)
    assert sum(p.numel() for p in irm.parameters()) == cfg.n_params
    linears = [m for m in irm.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (16, 48), (48, 48), (48, 48), (48, 48), (48, 4 * 16)
    ]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_model=0), "d_model"),
        (dict(d_model=-3), "d_model"),
        (dict(d_model=10**9), "d_model"),
        (dict(d_hidden=-1), "d_hidden"),
        (dict(n_hidden_layers=1000), "n_hidden_layers"),
        (dict(layers=(2, 0)), "sorted"),
        (dict(layers=(0, 4)), "outside the model"),
        (dict(inject_site="attn_out"), "inject_site"),
        (dict(read_site="blocks.0.attn.hook_z"), "read_site"),
        (dict(read_site="blocks.3.hook_resid_post"), "runs after the first injection"),
        (dict(output_scale=float("nan")), "output_scale"),
        (dict(d_model=4096, d_hidden=262_144, n_hidden_layers=64), "parameters"),
    ],
)
def test_config_refuses_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        _config(**kw)


def test_read_site_may_equal_an_injection_site_when_read_first():
    cfg = _config(read_site="blocks.0.hook_resid_post", layers=(0, 1))
    assert cfg.layers == (0, 1)


def test_zero_init_output_gives_zero_outputs():
    irm = IRM(_config(zero_init_output=True))
    out = irm(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 2, 16)
    assert torch.count_nonzero(out) == 0


def test_bf16_input_runs_the_matmuls_in_bf16_with_fp32_weights_and_grads():
    torch.manual_seed(0)
    irm = IRM(_config())
    resid = torch.randn(2, 5, 16)
    full = irm(resid)
    low = irm(resid.bfloat16())
    assert full.dtype == torch.float32 and low.dtype == torch.bfloat16
    # Exactly what an all-bf16 copy of the IRM computes (the matmuls ran in bf16) ...
    reference = copy.deepcopy(irm).bfloat16()(resid.bfloat16())
    torch.testing.assert_close(low, reference, atol=0, rtol=0)
    assert not torch.equal(low, full.bfloat16())  # ... not computed in fp32 and cast
    # ... and within a few bf16 roundings (2**-8 relative each) of the fp32 outputs.
    torch.testing.assert_close(low.float(), full, atol=4 * 2**-8 * float(full.detach().abs().max()), rtol=0)
    low.float().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in irm.parameters())


def test_forward_refuses_wrong_width():
    with pytest.raises(ShapeMismatchError, match="d_model=16"):
        IRM(_config())(torch.randn(1, 3, 17))


def test_irm_holds_no_activation_state():
    irm = IRM(_config())
    before = {k: v.clone() for k, v in irm.state_dict().items()}
    irm(torch.randn(3, 4, 16))
    assert irm.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in irm.state_dict().items())
    assert not [n for n, _ in irm.named_buffers()]


configs = st.builds(
    lambda d, n, k, h, depth, zero: IRMConfig(
        d_model=d,
        n_layers=n,
        layers=tuple(range(0, n, k)),
        d_hidden=h,
        n_hidden_layers=depth,
        zero_init_output=zero,
    ),
    st.integers(1, 24),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(1, 24),
    st.integers(0, 3),
    st.booleans(),
)


@settings(max_examples=25, deadline=None)
@given(cfg=configs)
def test_save_load_is_identity(tmp_path_factory, cfg):
    path = tmp_path_factory.mktemp("irm") / "irm.safetensors"
    irm = IRM(cfg)
    irm.save(path)
    loaded = IRM.load(path)
    assert loaded.config == cfg
    x = torch.randn(2, 3, cfg.d_model)
    assert torch.equal(irm(x), loaded(x))
    for (k, a), (k2, b) in zip(irm.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_config_json_round_trip():
    cfg = _config(output_scale=0.5, host_model="x")
    assert IRMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_save_into_directory_and_load_from_it(tmp_path):
    irm = IRM(_config())
    written = irm.save(tmp_path / "run")
    assert written == tmp_path / "run" / "irm.safetensors"
    assert IRM.load(tmp_path / "run").config == irm.config


def test_load_never_unpickles(tmp_path, monkeypatch):
    IRM(_config()).save(tmp_path / "a.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    IRM.load(tmp_path / "a.safetensors")


def test_mismatched_model_is_refused(tiny_model, tmp_path):
    cfg = IRMConfig(d_model=tiny_model.cfg.d_model + 1, n_layers=tiny_model.cfg.n_layers, layers=(0,))
    IRM(cfg).save(tmp_path / "a.safetensors")
    with pytest.raises(ShapeMismatchError, match="d_model=65"):
        IRM.load(tmp_path / "a.safetensors", tiny_model)
    cfg = IRMConfig(d_model=tiny_model.cfg.d_model, n_layers=tiny_model.cfg.n_layers + 2, layers=(0,))
    with pytest.raises(ShapeMismatchError, match="n_layers=6"):
        IRM(cfg).check_compatible(tiny_model)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = IRM(_config()).save(tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        IRM.load(path)


def test_corrupted_header_is_refused(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError):
        IRM.load(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="No IRM checkpoint"):
        IRM.load(tmp_path / "nothing")


def _rewrite_metadata(path, mutate):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    mutate(meta)
    save_file(tensors, str(path), metadata=meta)


def test_hostile_config_is_refused_before_allocation(tmp_path, monkeypatch):
    path = IRM(_config()).save(tmp_path / "a.safetensors")

    def huge(meta):
        cfg = json.loads(meta["config"])
        cfg["d_hidden"] = 10**12
        meta["config"] = json.dumps(cfg)

    _rewrite_metadata(path, huge)
    allocations = []
    monkeypatch.setattr(IRM, "__init__", lambda *a, **k: allocations.append(a))
    with pytest.raises(CheckpointError, match="d_hidden"):
        IRM.load(path)
    assert not allocations


def test_config_that_disagrees_with_tensors_is_refused(tmp_path):
    path = IRM(_config()).save(tmp_path / "a.safetensors")

    def wider(meta):
        cfg = json.loads(meta["config"])
        cfg["d_hidden"] = 9
        meta["config"] = json.dumps(cfg)

    _rewrite_metadata(path, wider)
    with pytest.raises(CheckpointError, match="do not match the config"):
        IRM.load(path)


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an irm_lens IRM checkpoint"):
        IRM.load(tmp_path / "other.safetensors")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    first = IRM(_config())
    path = first.save(tmp_path / "a.safetensors")
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        IRM(_config()).save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_save_to_unwritable_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(irm_lens.OutputPathError, match="Cannot create output directory"):
        IRM(_config()).save(blocker / "sub" / "irm.safetensors")


def test_for_model_sizes_from_the_model(tiny_model):
    irm = IRM.for_model(tiny_model, layers="every2", preset="paper")
    cfg = irm.config
    assert (cfg.d_model, cfg.n_layers, cfg.layers) == (64, 4, (1, 3))
    assert cfg.d_hidden == 192 and cfg.n_hidden_layers == 4
    assert cfg.host_model == tiny_model.cfg.model_name
    with pytest.raises(ConfigError, match="Unknown IRM preset"):
        IRM.for_model(tiny_model, preset="huge")


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    path = IRM(_config()).save(tmp_path / "a.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_steer_mode_is_validated_saved_and_defaults_for_old_files(tmp_path):
    with pytest.raises(ConfigError, match="steer"):
        _config(steer="prompt")
    irm = IRM(_config(steer="reply"))
    assert IRM.load(irm.save(tmp_path)).config.steer == "reply"
    old = _config().to_dict()
    del old["steer"]  # a file written before the field existed
    assert IRMConfig.from_dict(old).steer == "all"


def test_read_layer_is_the_read_sites_block():
    assert _config().read_layer == 0
    assert _config(read_site="blocks.2.hook_resid_pre", layers=(2, 3)).read_layer == 2
    assert _config(read_site="blocks.1.hook_resid_post", layers=(2, 3)).read_layer == 1
