"""Fault injection at the model level: bad inputs, weight edits of every kind, concurrent use of plain and kernelized
models.

Each case ends in one clear ValueError (naming what to do) or in the right numbers; nothing is left behind in the
process (kernelization is per model: no switch reaches another model or thread).
"""

from __future__ import annotations

import threading

import pytest
import torch

from internimage_hf import InternImageConfig, InternImageForImageClassification

from .conftest import rel_err


def tiny_config(**overrides) -> InternImageConfig:
    values = dict(channels=8, depths=[1, 1, 2, 1], groups=[1, 2, 2, 4], num_labels=5)
    values.update(overrides)
    return InternImageConfig(**values)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (offset/mask projections included, which the official init zeroes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.5 if "norm" in name and name.endswith("weight") else 0.2
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale
                + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
            )
    return model.eval()


def kernelized(model: torch.nn.Module) -> torch.nn.Module:
    """The model as `from_pretrained` leaves it on the CPU: DCNv3 kernel layer and oneDNN Linear/MLP layers."""
    from kernels import Mode, kernelize

    return kernelize(model, device="cpu", mode=Mode.INFERENCE)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomised(InternImageForImageClassification(tiny_config()))


def pixels(n: int = 2, size: int = 64, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def exact_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same weights run in float64 on plain PyTorch ops: what every float32 run must stay close to."""
    clone = InternImageForImageClassification(model.config).double().eval()
    clone.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return clone(x.double()).logits


# ------------------------------------------------------------------------------------------- bad pixel_values
BAD_INPUTS = {
    "none": (lambda: None, "specify pixel_values"),
    "list": (lambda: [[0.0] * 64] * 3, "torch.Tensor"),
    "numpy": (lambda: pixels().numpy(), "torch.Tensor"),
    "3-d": (lambda: pixels()[0], "shape"),
    "5-d": (lambda: pixels()[None], "shape"),
    "one channel": (lambda: pixels()[:, :1], "channels"),
    "channels-last": (lambda: pixels().permute(0, 2, 3, 1), "permute"),
    "integer": (lambda: (pixels() * 100).to(torch.int64), "floating-point"),
    "bool": (lambda: pixels() > 0, "floating-point"),
    "too small": (lambda: pixels(size=16), "at least 32x32"),
    "too narrow": (lambda: torch.randn(1, 3, 64, 31), "at least 32x32"),
    "float16 into float32 model": (lambda: pixels(dtype=torch.float16), "pixel_values are torch.float16"),
    "bfloat16 into float32 model": (lambda: pixels(dtype=torch.bfloat16), "pixel_values are torch.bfloat16"),
    "float64 into float32 model": (lambda: pixels(dtype=torch.float64), "pixel_values are torch.float64"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_pixel_values_give_one_clear_error(model, case):
    make, words = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=words), torch.no_grad():
        model(make())


def test_float32_model_under_autocast_takes_float32_pixels(model):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(pixels()).logits
    assert torch.isfinite(logits).all()


def test_h_g_heads_name_the_size_they_need():
    config = tiny_config(
        use_clip_projector=True,
        projector_dim=16,
        projector_out_dim=8,
        projector_num_heads=2,
        center_feature_scale=True,
        level2_post_norm=True,
        level2_post_norm_block_ids=[1],
        res_post_norm=True,
    )
    model = InternImageForImageClassification(config).eval()
    with pytest.raises(ValueError, match="multiples of 32"), torch.no_grad():
        model(torch.randn(1, 3, 80, 64))


# ----------------------------------------------------------------------------------------- special values
@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_give_non_finite_logits(model, backend, value, monkeypatch, request):
    if backend == "compiled":
        request.getfixturevalue("use_kernel")
    monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", backend)
    x = pixels()
    x[0, :, 20:30, 20:30] = value
    with torch.no_grad():
        logits = model(x).logits
    assert not torch.isfinite(logits[0]).all()
    assert torch.isfinite(logits[1]).all()  # the other image is untouched


def test_empty_batch(model):
    with torch.no_grad():
        out = model(pixels(n=0), output_hidden_states=True)
    assert out.logits.shape == (0, 5)
    assert out.hidden_states[1].shape == (0, 8, 16, 16)


# --------------------------------------------------------------------------------------------- weight edits
EDITS = {
    "in place under no_grad": lambda p: p.mul_(-1.5),
    "through .data": lambda p: p.data.mul_(-1.5),
    "through a NumPy view": lambda p: p.detach().numpy().__imul__(-1.5),
    "through .data's NumPy view": lambda p: p.data.numpy().__imul__(-1.5),
    "replaced storage (set_)": lambda p: p.data.set_(p.data.clone() * -1.5),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize(
    "which",
    [
        "classifier.weight",
        "internimage.encoder.levels.2.layers.1.mlp.fc1.weight",
        "internimage.encoder.levels.1.downsample.conv.weight",
        "internimage.embeddings.conv1.weight",
        "internimage.encoder.levels.0.layers.0.dcn.dw_conv.conv.weight",
    ],
)
def test_inference_never_serves_a_stale_weight(edit, which):
    """Whatever way a weight is edited between two inference calls, the second call computes with the new value
    (kernelized: the CPU layers read the weight on every call)."""
    model = kernelized(randomised(InternImageForImageClassification(tiny_config())))
    x = pixels()
    with torch.inference_mode():
        model(x)
        model(x)  # anything a call might prepare and keep is there now
    with torch.no_grad():
        EDITS[edit](model.get_parameter(which))
    with torch.inference_mode():
        after = model(x).logits
    assert rel_err(after, exact_logits(model, x)) < 1e-5


# ------------------------------------------------------------------------- per-model kernelization, threads
def test_kernelized_and_plain_models_side_by_side_in_threads(model):
    """Kernelizing one model changes nothing for another (no global switch): run both at once in threads."""
    import copy

    fast = kernelized(copy.deepcopy(model))
    x = pixels()
    with torch.no_grad():
        expected = {"plain": model(x).logits, "fast": fast(x).logits}
    assert rel_err(expected["fast"], expected["plain"]) < 1e-5
    results, errors = {}, []
    barrier = threading.Barrier(4)

    def run(i):
        name, net = ("plain", model) if i % 2 == 0 else ("fast", fast)
        try:
            barrier.wait(30)
            with torch.no_grad():
                for _ in range(3):
                    results[i] = (name, net(x).logits)
        except Exception as error:  # collected, so that a failure names itself
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(results) == 4
    assert all(torch.equal(logits, expected[name]) for name, logits in results.values())


def test_threads_sharing_one_model_agree_bit_for_bit(model):
    x = pixels()
    with torch.no_grad():
        expected = model(x).logits
    results, errors = [None] * 4, []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    results[i] = model(x).logits
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert all(torch.equal(r, expected) for r in results)


def test_float64_is_float64_plain_and_kernelized(model):
    """Nothing inside a float64 model computes in float32 (the mask softmax once did on the plain path)."""
    import copy

    x = pixels(dtype=torch.float64)
    double = randomised(InternImageForImageClassification(tiny_config())).double()
    with torch.no_grad():
        out = double(x).logits
        other = kernelized(copy.deepcopy(double))(x).logits
    assert out.dtype == other.dtype == torch.float64
    assert rel_err(out, other) < 1e-12
