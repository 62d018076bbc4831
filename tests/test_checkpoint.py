"""Checkpoints: safetensors round trip, metadata, and one-line ArtifactErrors for bad files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import ddpm
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.models import build_model, preset_config
from ddpm.schedule import Schedule
from ddpm.trainer.checkpoint import load_model, read_checkpoint_metadata, save_checkpoint


def _meta(**kw):
    return {
        "schedule": Schedule.cosine(100).config,
        "prediction": "v",
        "dataset": "digits",
        "step": 7,
        "ema_decay": 0.999,
        **kw,
    }


def _random_model(name, gen):
    model = build_model(preset_config(name))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny", "mlp"])
def test_round_trip_bitwise(tmp_path, torch_gen, name):
    model = _random_model(name, torch_gen)
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    assert path.read_bytes()[8:9] == b"{"  # safetensors: u64 header length, then a JSON header; no pickle
    loaded, meta = ddpm.load_model(path)  # through the lazy public API
    assert not loaded.training
    assert meta["model"] == model.config and meta["prediction"] == "v" and meta["step"] == 7
    assert meta["sample_shape"] == ([1, 8, 8] if name == "tiny" else [2])
    assert meta["schedule"] == Schedule.cosine(100).config and meta["ema_decay"] == 0.999
    x = torch.randn(5, *meta["sample_shape"], generator=torch_gen)
    t = torch.randint(0, 100, (5,), generator=torch_gen)
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded(x, t))
    assert read_checkpoint_metadata(path) == meta


def test_run_dir_resolves_to_model_safetensors(tmp_path, torch_gen):
    save_checkpoint(tmp_path / "model.safetensors", _random_model("mlp", torch_gen), _meta())
    assert read_checkpoint_metadata(tmp_path)["dataset"] == "digits"


def test_invalid_meta_writes_nothing(tmp_path, torch_gen):
    model = _random_model("mlp", torch_gen)
    with pytest.raises(ArtifactError, match="lacks required key"):
        save_checkpoint(tmp_path / "m.safetensors", model, {"prediction": "eps"})
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "m.safetensors", model, _meta())
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match=r"does not exist \(expected a \.safetensors file"):
        load_model(tmp_path / "absent.safetensors")


def test_garbage_and_truncated_files(tmp_path, torch_gen):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ArtifactError, match=r"bad\.safetensors: not a readable safetensors checkpoint"):
        load_model(bad)
    good = save_checkpoint(tmp_path / "good.safetensors", _random_model("tiny", torch_gen), _meta())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=r"cut\.safetensors: "):
        load_model(cut)


def _rewrite_header(src, dst, edit):
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    dst.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def test_safetensors_without_ddpm_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ArtifactError, match="no ddpm metadata found"):
        load_model(path)


def test_metadata_inconsistent_with_weights(tmp_path, torch_gen):
    good = save_checkpoint(tmp_path / "good.safetensors", _random_model("mlp", torch_gen), _meta())

    def widen(header):
        model = json.loads(header["__metadata__"]["model"])
        model["hidden"] = 2 * model["hidden"]
        header["__metadata__"]["model"] = json.dumps(model)

    _rewrite_header(good, tmp_path / "wide.safetensors", widen)
    with pytest.raises(ArtifactError, match="weights do not match the stored model config"):
        load_model(tmp_path / "wide.safetensors")

    def bad_prediction(header):
        header["__metadata__"]["prediction"] = "score"

    _rewrite_header(good, tmp_path / "pred.safetensors", bad_prediction)
    with pytest.raises(ArtifactError, match="unknown prediction 'score'"):
        load_model(tmp_path / "pred.safetensors")
