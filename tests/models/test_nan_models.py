"""`evaluate` and `evaluate-ijb` refuse a model with NaN/inf weights (a diverged run) in one line naming the
model file and the first bad tensor, for every model kind they load; a finite model gets past the check."""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers.teachers import Projection

from pipeline.models import get_model
from pipeline.models.finite import check_finite_embedder
from pipeline.models.loading import export_onnx, load_embedder
from pipeline.models.model_file import save_model

SIZE = 32
KWARGS = {"input_size": SIZE, "width": 0.125, "num_features": 16}


def _mbf(bad: float | None):
    torch.manual_seed(0)
    model = get_model("mbf", **KWARGS).eval()
    key = next(name for name, _ in model.named_parameters())
    if bad is not None:
        with torch.no_grad():
            model.get_parameter(key).view(-1)[3] = bad
    return model, key


def _model_pt(folder, bad):
    model, key = _mbf(bad)
    return save_model(folder / "model.pt", model, "mbf", KWARGS), key


def _state_dict(folder, bad):  # an arcface_torch backbone.pth
    model, key = _mbf(bad)
    torch.save(model.state_dict(), folder / "backbone.pth")
    return folder / "backbone.pth", key


def _torchscript(folder, bad):
    model = Projection(SIZE, 8)
    if bad is not None:
        model.p[5, 2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 flags TorchScript as deprecated
        torch.jit.script(model).save(str(folder / "model.ts"))
    return folder / "model.ts", "p"


def _onnx(folder, bad):
    model, _ = _mbf(bad)
    return export_onnx(model, folder / "model.onnx", SIZE), ""  # initializer names are the exporter's


KINDS = {"model.pt": _model_pt, "state dict": _state_dict, "torchscript": _torchscript, "onnx": _onnx}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("command", ["evaluate", "evaluate-ijb"])
def test_model_with_nan_or_inf_weights_is_refused(command, kind, bad, cli, tmp_path):
    path, key = KINDS[kind](tmp_path, bad)
    out = tmp_path / "run"
    data = ["--data", tmp_path / "data"] if command == "evaluate" else ["--ijb", tmp_path / "IJBC"]
    result = cli(command, "--model", path, *data, "--out", out, "--device", "cpu", "--input-size", SIZE)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {key}"), result.output
    assert "holds NaN/inf values" in lines[0], result.output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", list(KINDS))
def test_finite_model_passes_the_check(kind, tmp_path):
    path, _ = KINDS[kind](tmp_path, None)
    check_finite_embedder(load_embedder(path, device="cpu", input_size=SIZE))
