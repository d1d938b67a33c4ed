"""Teacher loading (arcface_torch state dicts, own checkpoints, TorchScript, ONNX) and model checkpoints."""

import hashlib
import pickle
import sys
import warnings

import pytest
import torch
from helpers.arcface_reference import functional_forward, program, random_state_dict
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import get_model
from pipeline.models.loading import export_onnx, file_sha256, load_embedder
from pipeline.models.model_file import load_model, save_model

TINY = dict(width=0.25, input_size=32, num_features=128)


def _batch(n, size, seed=0):
    """A normalised NCHW batch made from random uint8 pixels, as the data pipeline produces it."""
    pixels = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return (pixels.float() / 255 - 0.5) / 0.5


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_model(name="r18", seed=0, **kwargs):
    kwargs = {**TINY, **kwargs}
    model = get_model(name, **kwargs)
    model.load_state_dict(random_state_dict(program(name, **kwargs), seed=seed))
    return model.eval(), kwargs


# ------------------------------------------------------------------ arcface_torch state dicts

ARCFACE_FILES = [
    ("r18", TINY),
    ("mbf", dict(width=1.0, input_size=112, num_features=512)),  # the real mbf, ~8 MB
    ("mbf", dict(width=0.5, input_size=48, num_features=64)),
    # Depth inference for the big iresnets, at one channel per unit so they stay tiny.
    ("r50", dict(width=1 / 64, input_size=16, num_features=8)),
    ("r100", dict(width=1 / 64, input_size=16, num_features=8)),
    ("r200", dict(width=1 / 64, input_size=16, num_features=8)),
]


@pytest.mark.parametrize("name, kwargs", ARCFACE_FILES)
def test_arcface_state_dict_with_module_prefix_loads_strictly(tmp_path, name, kwargs):
    ops = program(name, **kwargs)
    sd = random_state_dict(ops, seed=2)
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)  # as saved from a DDP-wrapped backbone

    teacher = load_embedder(path)
    size = kwargs["input_size"]
    assert (teacher.name, teacher.kind, teacher.dim, teacher.input_size) == (
        name, "state_dict", kwargs["num_features"], size)
    assert teacher.fingerprint == _sha256(path)
    x = _batch(3, size)
    got = teacher(x)
    want = functional_forward(ops, sd, x)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_arcface_resume_checkpoint_backbone_is_found(tmp_path):
    ops = program("mbf", **TINY)
    sd = random_state_dict(ops, seed=4)
    path = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"epoch": 3, "global_step": 10, "state_dict_backbone": sd, "state_dict_softmax_fc": {}}, path)
    teacher = load_embedder(path)
    assert teacher.name == "mbf" and teacher.arch_kwargs["width"] == 0.25
    torch.testing.assert_close(teacher(_batch(2, 32)), functional_forward(ops, sd, _batch(2, 32)))


def test_wrong_arch_lists_missing_keys(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(random_state_dict(program("r18", **TINY)), path)
    with pytest.raises(PipelineError, match=r"missing keys: layer1\.2\.bn1\.weight.*\(\+\d+ more\)") as err:
        load_embedder(path, arch="r34")
    assert str(path) in str(err.value) and "unexpected" not in str(err.value)


def test_tampered_keys_are_named(tmp_path):
    sd = random_state_dict(program("r18", **TINY))
    sd.pop("fc.bias")
    sd["head.extra.weight"] = torch.zeros(3)
    path = tmp_path / "tampered.pt"
    torch.save(sd, path)
    with pytest.raises(PipelineError, match=r"missing keys: fc\.bias; unexpected keys: head\.extra\.weight"):
        load_embedder(path)


def test_shape_override_that_does_not_fit_is_refused(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(random_state_dict(program("r18", **TINY)), path)
    with pytest.raises(PipelineError, match=r"fc\.weight has shape \(128, 512\), expected \(64, 512\)"):
        load_embedder(path, num_features=64)


def test_inference_names_a_malformed_key(tmp_path):
    sd = random_state_dict(program("r18", **TINY))
    sd["conv1.weight"] = sd["conv1.weight"].flatten()
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(PipelineError, match=r"bad\.pt: key conv1\.weight is \(432,\), expected a 4-d tensor"):
        load_embedder(path)


def test_unknown_layout_asks_for_arch(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(PipelineError, match="cannot infer the architecture.*arch="):
        load_embedder(path)


class _Payload:
    """Unpickling this object would create `marker` (a stand-in for arbitrary code execution)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_arbitrary_globals_is_refused_without_executing(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    for loader in (load_embedder, load_model):
        with pytest.raises(PipelineError, match=r"evil\.pt: not a plain state dict: loading it would run code "
                                                r"\(.*open\), which is refused; .*model\.state_dict\(\)") as info:
            loader(path)
        assert "weights_only" not in str(info.value) and "\n" not in str(info.value)  # never the advice to lift it
    assert not marker.exists()
    # The payload is live: an unrestricted load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"garbage, not a torch file", pickle.dumps({"a": 1.0}, protocol=4),
                                     b"PK\x03\x04 a torn zip"])
def test_a_garbage_file_is_one_line_without_torch_advice(tmp_path, content, cli):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=r"weights\.pt: not a torch weights file \(corrupt, truncated or another "
                                            r"format; ") as info:
        load_embedder(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    result = cli("evaluate", "--model", path, "--data", tmp_path, "--out", tmp_path / "eval")
    assert result.exit_code == 2 and result.output.strip() == f"error: {info.value}"


# ------------------------------------------------------------------ own checkpoints


def test_checkpoint_round_trip(tmp_path):
    model, kwargs = _tiny_model("mbf", seed=7)
    path = save_model(tmp_path / "run" / "model.pt", model, "mbf", kwargs, extra={"epoch": 3, "acc": 0.91})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert (raw["format"], raw["version"], raw["arch"]) == ("ekd-pipeline-model", 1, "mbf")

    loaded, meta = load_model(path)
    assert not loaded.training
    assert meta["arch_kwargs"] == kwargs and meta["extra"] == {"epoch": 3, "acc": 0.91}
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert list(got_sd) == list(ref_sd) and all(torch.equal(got_sd[k], ref_sd[k]) for k in ref_sd)
    x = _batch(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    teacher = load_embedder(path)
    assert (teacher.kind, teacher.name, teacher.dim, teacher.input_size) == ("checkpoint", "mbf", 128, 32)
    assert torch.equal(teacher(x), loaded(x).detach())
    with pytest.raises(PipelineError, match="holds 'mbf'"):
        load_embedder(path, arch="r18")
    # Stored arch_kwargs can be overridden (fp16 only acts on CUDA), but the weights must still fit.
    assert torch.equal(load_embedder(path, fp16=True)(x), teacher(x))
    with pytest.raises(PipelineError, match=r"features\.layers\.2\.weight has shape \(128, 128\)"):
        load_embedder(path, num_features=64)


def test_checkpoint_with_wrong_keys_is_refused(tmp_path):
    model, kwargs = _tiny_model("r18")
    sd = model.state_dict()
    sd["bogus.weight"] = sd.pop("bn2.running_var")
    path = tmp_path / "model.pt"
    torch.save({"format": "ekd-pipeline-model", "version": 1, "arch": "r18", "arch_kwargs": kwargs,
                "state_dict": sd, "extra": {}}, path)
    with pytest.raises(PipelineError, match=r"model\.pt.*missing keys: bn2\.running_var; unexpected keys: bogus"):
        load_model(path)


def test_save_model_refuses_non_json_extra(tmp_path):
    model, kwargs = _tiny_model("r18")
    with pytest.raises(ValueError, match="extra"):
        save_model(tmp_path / "m.pt", model, "r18", kwargs, extra={"tensor": torch.zeros(1)})
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ TorchScript and ONNX


def test_torchscript_teacher_equals_eager(tmp_path):
    model, kwargs = _tiny_model("r18", seed=3)
    path = tmp_path / "teacher.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(model, _batch(1, 32)), str(path))
    teacher = load_embedder(path, input_size=32)
    assert (teacher.kind, teacher.dim, teacher.input_size) == ("torchscript", 128, 32)
    assert teacher.fingerprint == _sha256(path)
    x = _batch(5, 32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(PipelineError, match="width cannot be applied.*only input_size"):
        load_embedder(path, input_size=32, width=0.5)


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_onnx_export_round_trip(tmp_path, name):
    model, kwargs = _tiny_model(name, seed=1)
    path = export_onnx(model, tmp_path / "teacher.onnx", input_size=32)
    teacher = load_embedder(path)
    assert (teacher.kind, teacher.dim, teacher.input_size) == ("onnx", 128, 32)
    for n in (1, 4):  # dynamic batch axis
        x = _batch(n, 32, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), model(x), rtol=1e-4, atol=1e-4)


class _RawPixelModel(nn.Module):
    """Like mxnet-converted insightface models: takes 0..255 pixels and normalises inside the graph."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x - 127.5) * (1 / 127.5))


def _legacy_onnx_export(model, path, batch, dynamic):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(batch, 3, 32, 32),), str(path), input_names=["data"],
                          output_names=["fc1"], opset_version=17, dynamo=False,
                          dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}} if dynamic else None)


def test_onnx_raw_pixel_model_gets_pixels(tmp_path):
    model, _ = _tiny_model("r18", seed=2)
    path = tmp_path / "mxnet_style.onnx"
    _legacy_onnx_export(_RawPixelModel(model).eval(), path, batch=1, dynamic=True)
    teacher = load_embedder(path)
    x = _batch(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=1e-4, atol=1e-4)


def test_onnx_fixed_batch_model_is_run_in_padded_chunks(tmp_path):
    model, _ = _tiny_model("mbf", seed=2)
    path = tmp_path / "fixed.bin"  # no .onnx suffix: detected from the protobuf header
    _legacy_onnx_export(model, path, batch=2, dynamic=False)
    teacher = load_embedder(path)
    assert teacher.kind == "onnx"
    x = _batch(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=1e-4, atol=1e-4)


def test_onnx_without_onnxruntime_gives_clear_error(tmp_path, monkeypatch):
    model, _ = _tiny_model("r18")
    path = export_onnx(model, tmp_path / "t.onnx", input_size=32)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(PipelineError, match="onnxruntime"):
        load_embedder(path)


# ------------------------------------------------------------------ helpers and input checks


def test_file_sha256_streams_large_files(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(torch.randint(0, 256, (5 * 2**20 // 2 + 3,), dtype=torch.uint8).numpy().tobytes())
    assert file_sha256(path) == _sha256(path)


def test_teacher_rejects_wrong_input_shape(tmp_path):
    model, kwargs = _tiny_model("r18")
    path = save_model(tmp_path / "m.pt", model, "r18", kwargs)
    teacher = load_embedder(path)
    with pytest.raises(PipelineError, match=r"expects \(B, 3, 32, 32\)"):
        teacher(torch.zeros(2, 3, 48, 48))
    assert teacher(torch.zeros(0, 3, 32, 32)).shape == (0, 128)


def test_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_embedder(tmp_path / "nope.pt")
