"""`ddpm eval`: the metric math against direct computations, the FID Inception plumbing with random weights,
the classifier proxy on real digits vs noise, swiss-roll points, cached references and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch

from ddpm import cli
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.evaluation.evaluate import evaluate, evaluate_report
from ddpm.evaluation.features import reference_labels, train_classifier
from ddpm.evaluation.inception import FIDInceptionV3, inception_pool3, load_fid_inception
from ddpm.evaluation.metrics import feature_stats, frechet_distance, precision_recall
from ddpm.evaluation.reference import build_reference_stats, complement_stats, save_reference
from ddpm.images import to_uint8_nhwc
from ddpm.trainer.data import swissroll


def _digits_u8() -> np.ndarray:
    from sklearn.datasets import load_digits

    return to_uint8_nhwc(load_digits().images[:, None] / 8.0 - 1.0)


def _npz(path, arr=None, **arrays):
    if arr is not None:
        arrays["arr_0"] = arr
    np.savez(path, **arrays)
    return str(path)


def _npy(path, arr):
    np.save(path, arr)
    return str(path)


def _junk(path):
    path.write_bytes(b"PK\x03\x04 truncated")
    return str(path)


# ---- the math ----


@pytest.mark.parametrize("d", [1, 5, 32])
def test_frechet_distance_matches_scipy_sqrtm(rng, d):
    from scipy import linalg

    a, b = rng.standard_normal((200, d)), rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) + 0.5
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    covmean = linalg.sqrtm(s1 @ s2)
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    # Both are float64 computations of the same quantity; sqrtm's Schur iteration loses ~1e-10 relative.
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7, abs=1e-9)


def test_frechet_distance_zero_for_same_rank_deficient_gaussian(rng):
    x = rng.standard_normal((10, 64))  # 10 points in 64-d: sigma has rank 9, where sqrtm needs an offset
    mu, s = feature_stats(x)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_precision_recall_constructed_cases(rng):
    real = rng.standard_normal((100, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0) == (0.0, 0.0)
    # Half the fakes are real points (inside), half are far away (outside): precision is exactly one half.
    fake = np.concatenate([real[:50], real[50:] + 1000.0])
    p, r = precision_recall(real, fake)
    assert p == 0.5 and r >= 0.5
    with pytest.raises(InvalidArgumentError, match="needs more than 3 points"):
        precision_recall(real[:3], real[:3])


def test_complement_stats_equal_direct_computation(rng):
    f = rng.standard_normal((300, 6)) * 3 + 1
    stats = build_reference_stats(f, dataset="x", space="s", kind="classifier", image_shape=(8, 8, 1), seed=0)
    subset = stats.pool[:40].astype(np.float64)
    rest = np.array(
        [row for row in np.asarray(f, np.float32).astype(np.float64) if not (row == subset).all(1).any()]
    )
    mu, sigma = complement_stats(stats, subset)
    assert len(rest) == 260
    np.testing.assert_allclose(mu, rest.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(rest, rowvar=False), rtol=1e-9, atol=1e-11)


# ---- FID's Inception-v3 with random weights (no download, no weights file in CI) ----


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_inception_architecture_matches_fid_network(random_inception):
    net, _ = random_inception
    # torchvision's inception_v3 has 27,161,264 parameters; FID's has no aux head (3,326,696) and 1008
    # classes instead of 1000 (+8 x 2049).
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    keys = list(net.state_dict())
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in keys and "fc.weight" in keys
    assert not any(k.startswith("AuxLogits") for k in keys)


def test_inception_pool3_plumbing(random_inception):
    net, path = random_inception
    loaded, fingerprint = load_fid_inception(path)
    seen = []
    hook = loaded.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        grey = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
        feats = inception_pool3(loaded, grey)
    finally:
        hook.remove()
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    x = seen[0]
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1.0 and x.max() <= 1.0
    assert torch.equal(x[:, 0], x[:, 2])  # grey repeated to RGB
    assert len(fingerprint) == 16
    # The loaded weights are the saved ones: same features as the network that was saved.
    with torch.no_grad():
        direct = net(torch.from_numpy(grey).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) / 255.0)
    np.testing.assert_allclose(feats, direct.double().numpy(), rtol=1e-5, atol=1e-6)


def test_inception_refuses_other_state_dicts(random_inception, tmp_path):
    _, path = random_inception
    sd = torch.load(path, weights_only=True)
    renamed = {
        ("Mixed_6b.branch1x1.conv.weightX" if k == "Mixed_6b.branch1x1.conv.weight" else k): v
        for k, v in sd.items()
    }
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ArtifactError, match="missing key 'Mixed_6b.branch1x1.conv.weight'"):
        load_fid_inception(tmp_path / "renamed.pth")
    torch.save({**sd, "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "shape.pth")
    with pytest.raises(ArtifactError, match=r"'fc.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"):
        load_fid_inception(tmp_path / "shape.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ArtifactError, match="not a state dict of tensors"):
        load_fid_inception(tmp_path / "tensor.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ArtifactError, match="cannot load as a torch state dict"):
        load_fid_inception(tmp_path / "junk.pth")


# ---- the classifier proxy on the digits ----


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory):
    """Reference statistics of the digits, built once through the CLI (`--save-ref`, no samples), with an
    empty torch hub cache: the command must say which weights file FID needs, then use the proxy."""
    tmp = tmp_path_factory.mktemp("ref")
    path, err, out = tmp / "digits_ref.npz", io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        mp.setenv("TORCH_HOME", str(tmp / "torch_home"))
        assert cli.main(["eval", "--ref", "digits", "--save-ref", str(path)]) == 0
    assert "pt_inception-2015-12-05-6726825d.pth" in err.getvalue() and "FD-classifier" in err.getvalue()
    assert f"wrote {path}: 1797 images of digits" in out.getvalue()
    return str(path)


def test_real_digits_score_near_the_real_scale_and_noise_far(digits_ref, tmp_path):
    u = _digits_u8()[np.random.default_rng(3).permutation(1797)[:200]]
    noise = np.random.default_rng(4).integers(0, 256, u.shape, dtype=np.uint8)
    real = evaluate(_npz(tmp_path / "real.npz", u), digits_ref)["metrics"]
    bad = evaluate(_npz(tmp_path / "noise.npz", noise), digits_ref)["metrics"]
    fd, fd_noise = real["fd_classifier"], bad["fd_classifier"]
    assert fd["value"] < fd["scale"] + 3 * fd["spread"]
    assert fd_noise["value"] > 20 * fd["value"]
    assert real["precision"]["value"] > 0.8 and bad["precision"]["value"] < 0.5
    assert bad["recall"]["value"] < 0.2
    assert real["classifier_confidence"]["value"] > 0.95 > bad["classifier_confidence"]["value"]
    assert real["class_coverage"]["value"] == 1.0


def test_cli_table_json_and_markdown(digits_ref, tmp_path, capsys):
    samples = _npz(tmp_path / "s.npz", _digits_u8()[:64])
    md = tmp_path / "report.md"
    assert cli.main(["eval", samples, "--ref", digits_ref, "--out", str(md)]) == 0
    out = capsys.readouterr().out
    for word in ("FD-classifier", "precision (k=3)", "recall (k=3)", "class coverage", "scale", "±"):
        assert word in out
    assert md.read_text().startswith("# ddpm eval") and "| FD-classifier |" in md.read_text()
    assert not list(tmp_path.glob(".*.tmp"))
    assert cli.main(["eval", samples, "--ref", digits_ref, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["samples"]["count"] == 64 and d["reference"]["count"] == 1797
    assert set(d["metrics"]) >= {"fd_classifier", "precision", "recall", "classifier_confidence"}


def test_proxy_classifier_is_deterministic_for_a_seed():
    u = _digits_u8()[:300]
    labels = reference_labels("digits", 1797)[:300]
    a, b = (train_classifier(u, labels, dataset="digits", seed=1, steps=5) for _ in range(2))
    np.testing.assert_array_equal(a(u[:10]), b(u[:10]))
    c = train_classifier(u, labels, dataset="digits", seed=2, steps=5)
    assert not np.array_equal(a(u[:10]), c(u[:10]))


def test_labels_of_cifar10_and_mnist_files(tmp_path):
    records = np.zeros((3, 3073), np.uint8)
    records[:, 0] = [7, 2, 9]
    (tmp_path / "data_batch_1.bin").write_bytes(records.tobytes())
    assert reference_labels(f"cifar10:{tmp_path}", 3).tolist() == [7, 2, 9]
    idx = (0x0801).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([4, 1])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx)
    assert reference_labels(f"mnist:{tmp_path}", 2).tolist() == [4, 1]
    assert reference_labels(f"folder:{tmp_path}", 2) is None


def test_labels_of_a_folder_of_class_subfolders(tmp_path):
    from PIL import Image

    for name, n in (("dog", 2), ("cat", 1)):
        (tmp_path / name).mkdir()
        for k in range(n):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / f"{k}.png")
    assert reference_labels(f"folder:{tmp_path}", 3).tolist() == [0, 1, 1]  # cat, then dog: sorted names
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "loose.png")
    assert reference_labels(f"folder:{tmp_path}", 4) is None  # not one sub-folder per class: unlabelled


# ---- points ----


def test_swissroll_points(tmp_path):
    good = evaluate(_npz(tmp_path / "roll.npz", swissroll(500, seed=7)), "swissroll")["metrics"][
        "energy_distance"
    ]
    gauss = np.random.default_rng(0).standard_normal((500, 2)).astype(np.float32)
    bad = evaluate(_npz(tmp_path / "g.npz", gauss), "swissroll")["metrics"]["energy_distance"]
    assert abs(good["value"] - good["scale"]) < 4 * good["spread"] + 1e-3
    assert bad["value"] > 10 * max(good["value"], good["spread"])


# ---- feature spaces are never mixed ----


def test_cached_references_refuse_other_feature_spaces(digits_ref, random_inception, tmp_path):
    _, weights = random_inception
    samples = _digits_u8()[:8]
    with pytest.raises(InvalidArgumentError, match="FD-classifier statistics"):
        evaluate_report(samples, digits_ref, inception_weights=weights)
    f = np.random.default_rng(0).standard_normal((20, 4))
    fake = build_reference_stats(
        f,
        dataset="digits",
        space="inception-v3 pool3 (2048-d), weights sha256 0000000000000000",
        kind="inception",
        image_shape=(8, 8, 1),
        seed=0,
    )
    save_reference(fake, tmp_path / "inc.npz")
    with pytest.raises(InvalidArgumentError, match="pass --inception-weights"):
        evaluate_report(samples, tmp_path / "inc.npz", inception_weights=None)
    with pytest.raises(InvalidArgumentError, match="features of different networks cannot be compared"):
        evaluate_report(samples, tmp_path / "inc.npz", inception_weights=weights)


# ---- bad inputs: one line, exit code 2 ----


def _bad_cases(tmp_path, digits_ref):
    d = _digits_u8()
    (tmp_path / "junk.pth").write_bytes(b"junk")
    return [
        (["--ref", "digits"], _npz(tmp_path / "no_arr.npz", images=d[:8]), "no arr_0"),
        (
            ["--ref", "digits"],
            _npz(tmp_path / "i64.npz", d[:8].astype(np.int64)),
            "arr_0 must be uint8 images",
        ),
        (
            ["--ref", "digits"],
            _npz(tmp_path / "nchw.npz", d[:8].transpose(0, 3, 1, 2)),
            r"shape \[8, 1, 8, 8\]",
        ),
        (
            ["--ref", "swissroll"],
            _npz(tmp_path / "nan.npz", np.full((8, 2), np.nan, np.float32)),
            "NaN or Inf",
        ),
        (["--ref", "swissroll"], _npz(tmp_path / "p3.npz", np.zeros((8, 3), np.float32)), "D = 3"),
        (["--ref", "digits"], _npz(tmp_path / "pts.npz", np.zeros((8, 2), np.float32)), "holds images"),
        (["--ref", "digits"], _npz(tmp_path / "rgb.npz", np.repeat(d[:8], 3, axis=3)), "3 channel"),
        (["--ref", digits_ref], _npz(tmp_path / "big.npz", np.zeros((8, 16, 16, 1), np.uint8)), "16x16"),
        (["--ref", "cats"], _npz(tmp_path / "ok.npz", d[:8]), "unknown dataset 'cats'"),
        (["--ref", str(tmp_path / "ok.npz")], str(tmp_path / "ok.npz"), "not ddpm eval reference statistics"),
        (
            ["--ref", "digits", "--inception-weights", str(tmp_path / "junk.pth")],
            str(tmp_path / "ok.npz"),
            "cannot load as a torch state dict",
        ),
        (["--ref", "digits"], str(tmp_path / "missing.npz"), "does not exist"),
        (["--ref", "digits"], _npy(tmp_path / "a.npy", d[:8]), "a .npy array, not an npz"),
        (["--ref", "digits"], _junk(tmp_path / "junk.npz"), "not a readable npz"),
        (
            ["--ref", "digits", "--device", "tpu"],
            str(tmp_path / "ok.npz"),
            "unknown device 'tpu'; allowed: auto, cpu, cuda",
        ),
        (["--ref", "digits"], _npz(tmp_path / "few.npz", d[:3]), "at least 4"),
    ]


def test_bad_inputs_exit_2_with_one_line(digits_ref, tmp_path, capsys):
    for args, samples, match in _bad_cases(tmp_path, digits_ref):
        assert cli.main(["eval", samples, *args]) == 2, match
        err = capsys.readouterr().err
        assert re.search(match, err), (match, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
