"""`pipeline export`: the ONNX file computes the torch model's embeddings (checked here with onnxruntime
directly, on other inputs and batch sizes than the stage's own check), and nothing is written when the check
fails or the run breaks half-way."""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

import stages.export as export_stage
from pipeline.errors import DataError
from pipeline.models import get_model
from pipeline.models.loading import export_onnx
from pipeline.models.model_file import load_model, save_model
from pipeline.models.onnx_metadata import read_preprocessing
from pipeline.models.preprocess import to_tensor

SIZE = 32
MODELS = {
    "mbf": {"input_size": SIZE, "width": 0.125, "num_features": 16},
    "r18": {"input_size": SIZE, "width": 0.125, "num_features": 24},
}


def make_run(folder, arch, seed=0):
    """A run folder with a model.pt whose BatchNorm statistics are random (so every layer matters)."""
    torch.manual_seed(seed)
    model = get_model(arch, **MODELS[arch])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    return save_model(folder / "model.pt", model.eval(), arch, MODELS[arch])


@pytest.mark.parametrize("arch", MODELS)
def test_onnx_embeddings_equal_torch(tmp_path, arch, cli):
    model_path = make_run(tmp_path, arch)
    onnx_path = tmp_path / "deploy" / "x.onnx"
    result = cli("export", "--model", model_path, "--onnx", onnx_path)
    assert result.exit_code == 0, result.output
    assert f"wrote {onnx_path}" in result.output
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["x.onnx"]  # no temporary left behind

    net, _ = load_model(model_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.shape[1:] == [3, SIZE, SIZE] and not isinstance(inp.shape[0], int)  # dynamic batch
    rng = np.random.default_rng(123)
    for batch in (1, 5):
        pixels = rng.integers(0, 256, size=(batch, SIZE, SIZE, 3)).astype(np.float32)
        images = ((pixels / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()  # the project's preprocessing
        got = session.run([out.name], {inp.name: images})[0]
        with torch.no_grad():
            expected = net(torch.from_numpy(images)).numpy()
        assert got.shape == (batch, MODELS[arch]["num_features"])
        assert np.abs(got - expected).max() <= 1e-4
        assert np.abs(expected).max() > 1e-2  # not a degenerate all-zero comparison


@pytest.mark.parametrize("arch", MODELS)
def test_onnx_metadata_records_the_preprocessing(tmp_path, arch, cli):
    """Read with the onnx package alone (as another runtime would): the recorded normalisation, applied to
    0..255 RGB pixels, gives the input the graph computes the torch model's embedding from."""
    import json

    import onnx

    model_path = make_run(tmp_path, arch)
    onnx_path = tmp_path / "x.onnx"
    assert cli("export", "--model", model_path, "--onnx", onnx_path).exit_code == 0
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert props["input_color"] == "RGB" and props["input_layout"] == "NCHW"
    assert props["input_size"] == f"{SIZE}x{SIZE}"
    assert props["input_normalisation"] == "(x - 127.5) / 127.5 on 0..255 pixels"
    assert props["embedding_size"] == str(MODELS[arch]["num_features"]) and props["arch"] == arch
    assert "flip" in props["flip_sum"] and "not L2-normalised" in props["output"]
    described = json.loads(props["preprocessing"])
    assert (described["size"], described["color"], described["layout"]) == (SIZE, "RGB", "NCHW")

    pixels = np.random.default_rng(5).integers(0, 256, size=(3, SIZE, SIZE, 3)).astype(np.float32)
    images = ((pixels - described["pixel_mean"]) / described["pixel_std"]).transpose(0, 3, 1, 2).copy()
    net, _ = load_model(model_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    with torch.no_grad():
        expected = net(to_tensor(pixels.astype(np.uint8))).numpy()  # the project's own preprocessing
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert read_preprocessing(onnx_path) == described


def test_failed_parity_writes_nothing(tmp_path, monkeypatch, cli):
    """An ONNX graph that does not compute the model (here: from perturbed weights) is refused."""
    model_path = make_run(tmp_path, "mbf")
    onnx_path = tmp_path / "x.onnx"
    onnx_path.write_bytes(b"previous export")

    def export_perturbed(net, path, size, metadata=None):
        wrong = copy.deepcopy(net)
        with torch.no_grad():
            for param in wrong.parameters():
                param.mul_(1.05)
        return export_onnx(wrong, path, size, metadata=metadata)

    monkeypatch.setattr(export_stage, "export_onnx", export_perturbed)
    result = cli("export", "--model", model_path, "--onnx", onnx_path)
    assert result.exit_code == 2
    assert f"{onnx_path}: onnxruntime differs from torch" in result.output and "not written" in result.output
    assert onnx_path.read_bytes() == b"previous export"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "x.onnx"]


def test_broken_check_leaves_no_temporary(tmp_path, monkeypatch, cli):
    model_path = make_run(tmp_path, "mbf")

    def unloadable(path, *args, **kwargs):
        raise DataError(f"{path}: onnxruntime cannot load the model: simulated")

    monkeypatch.setattr(export_stage, "load_embedder", unloadable)
    result = cli("export", "--model", model_path, "--onnx", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "simulated" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_not_a_model_file_is_a_clear_error(tmp_path, cli):
    bogus = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    result = cli("export", "--model", bogus, "--onnx", tmp_path / "x.onnx")
    assert result.exit_code == 2
    assert f"{bogus}: not an ekd-pipeline-model file" in result.output
    assert not (tmp_path / "x.onnx").exists()


def make_trained_like_run(folder):
    """An mbf student shaped like a trained one: small BatchNorm variances blow the raw embeddings of random
    inputs up to norms far above 1, as trained students' are (where an absolute tolerance refuses a correct
    export)."""
    torch.manual_seed(1)
    model = get_model("mbf", **MODELS["mbf"])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_var.uniform_(0.01, 0.02)
    return save_model(folder / "model.pt", model.eval(), "mbf", MODELS["mbf"]), model


def test_own_student_with_large_embeddings_is_accepted(tmp_path, cli):
    model_path, model = make_trained_like_run(tmp_path)
    with torch.no_grad():
        norms = model(torch.rand(4, 3, SIZE, SIZE) * 2 - 1).norm(dim=1)
    assert norms.min() > 1e3  # the regime where absolute differences of float32 rounding exceed 1e-4
    result = cli("export", "--model", model_path, "--onnx", tmp_path / "x.onnx")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.onnx").is_file()


def test_nan_weights_are_refused(tmp_path, cli):
    torch.manual_seed(0)
    model = get_model("mbf", **MODELS["mbf"])
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    model_path = save_model(tmp_path / "model.pt", model.eval(), "mbf", MODELS["mbf"])
    result = cli("export", "--model", model_path, "--onnx", tmp_path / "x.onnx")
    assert result.exit_code == 2, result.output
    assert f"{model_path}: " in result.output and "NaN/inf" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-1e-4"])
def test_bad_tolerance_is_refused(tmp_path, cli, tolerance):
    model_path = make_run(tmp_path, "mbf")
    result = cli("export", "--model", model_path, "--onnx", tmp_path / "x.onnx", "--tolerance", tolerance)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: --tolerance {float(tolerance)}: must be a finite number >= 0"]
    assert not (tmp_path / "x.onnx").exists()
