"""Backbones: arcface_torch key/shape layout, numerical equivalence to a functional reference, demo knobs.

The expected layouts and the reference forward come from tests/helpers/arcface_reference.py, written from
the arcface_torch architecture definition, independently of pipeline.models.
"""

import math

import pytest
import torch
from helpers.arcface_reference import (
    expected_entries,
    functional_forward,
    program,
    random_state_dict,
)

from pipeline.models import MODEL_NAMES, count_parameters, get_model


def _layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _expected_layout(ops):
    return [(k, shape) for k, shape, _ in expected_entries(ops)]


def test_model_names():
    assert MODEL_NAMES == ("r18", "r34", "r50", "r100", "r200", "mbf")


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100", "r200", "mbf"])
def test_default_state_dict_is_arcface_layout(name):
    # Meta tensors: exact keys, order and shapes without allocating r200's 119M parameters.
    with torch.device("meta"):
        model = get_model(name)
    assert _layout(model) == _expected_layout(program(name))


@pytest.mark.parametrize("name", ["r18", "r100", "mbf"])
def test_parameter_count(name):
    with torch.device("meta"):
        model = get_model(name)
    from_spec = sum(math.prod(shape) for _, shape, is_param in expected_entries(program(name)) if is_param)
    assert count_parameters(model) == from_spec


def test_iresnet_embedding_bn_scale_is_frozen_like_arcface():
    model = get_model("r18", width=0.25, input_size=16)
    frozen = model.features.weight.numel()
    assert not model.features.weight.requires_grad
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


SMALL = [
    ("r18", dict(width=0.25, input_size=32, num_features=128)),
    ("r18", dict(width=0.5, input_size=48)),
    ("r34", dict(width=0.25, input_size=48, num_features=128)),
    ("mbf", dict(width=0.25, input_size=32, num_features=128)),
    ("mbf", dict(width=0.5, input_size=48, num_features=64)),
]


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_small_variant_layout_and_output_shape(name, kwargs):
    model = get_model(name, **kwargs).eval()
    assert _layout(model) == _expected_layout(program(name, **kwargs))
    size = kwargs["input_size"]
    out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, kwargs.get("num_features", 512)) and out.dtype == torch.float32


def test_dropout_and_fp16_knobs_keep_the_layout():
    for name in ("r18", "mbf"):
        with torch.device("meta"):
            model = get_model(name, dropout=0.3, fp16=True)
        assert _layout(model) == _expected_layout(program(name))


def _assert_matches_reference(name, kwargs, batch=2, seed=0):
    ops = program(name, **{k: v for k, v in kwargs.items() if k in ("width", "input_size", "num_features")})
    sd = random_state_dict(ops, seed=seed)
    model = get_model(name, **kwargs)
    model.load_state_dict(sd, strict=True)
    model.eval()
    size = kwargs.get("input_size", 112)
    pixels = torch.randint(0, 256, (batch, size, size, 3), generator=torch.Generator().manual_seed(seed + 1))
    x = ((pixels.float() / 255 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        got, want = model(x), functional_forward(ops, sd, x)
    assert got.shape == want.shape == (batch, kwargs.get("num_features", 512))
    assert want.abs().max() > 0.1  # the reference is not degenerate
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_default_forward_matches_functional_reference(name):
    _assert_matches_reference(name, {})


@pytest.mark.parametrize("name, kwargs", SMALL + [("mbf", dict(width=0.25, input_size=32, fp16=True)),
                                                  ("r18", dict(width=0.25, input_size=32, dropout=0.5))])
def test_small_forward_matches_functional_reference(name, kwargs):
    # fp16 autocast only applies on CUDA and dropout only in training, so eval on CPU is exact.
    _assert_matches_reference(name, kwargs, batch=3, seed=5)


def test_dropout_is_active_in_training_only():
    model = get_model("mbf", width=0.25, input_size=16, dropout=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("kwargs", [dict(input_size=100), dict(input_size=0), dict(width=0)])
def test_bad_knobs_are_refused(kwargs):
    for name in ("r18", "mbf"):
        with pytest.raises(ValueError):
            get_model(name, **kwargs)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="r18"):
        get_model("resnet9000")
