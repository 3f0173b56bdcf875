"""Behaves like a model that ships inside transformers: Auto classes, pipeline, heads, dtypes, checkpointing."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

import internimage_hf
from internimage_hf import (
    InternImageBackbone,
    InternImageConfig,
    InternImageForImageClassification,
    InternImageModel,
)

from .conftest import rel_err

LABELS = {0: "cat", 1: "dog", 2: "owl"}


def tiny_config(**overrides) -> InternImageConfig:
    fields = dict(
        channels=16,
        depths=[1, 1, 2, 1],
        groups=[1, 2, 4, 8],
        num_labels=3,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        image_size=64,
    )
    fields.update(overrides)
    return InternImageConfig(**fields)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (offset/mask projections included) so sampling is really deformable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = randomise(InternImageForImageClassification(tiny_config())).eval()
    model.save_pretrained(folder)
    internimage_hf.make_image_processor(64).save_pretrained(folder)
    return folder, model


def pixels(n=2, h=64, w=64, seed=1):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_round_trip_through_every_auto_class(saved_model):
    """Bit-identical outputs after a save/load round trip, the saved model kernelized as `from_pretrained`
    kernelizes the loaded ones (by default from transformers 5.25)."""
    from internimage_hf.modeling_internimage import _KERNELIZE_BY_DEFAULT

    folder, model = saved_model
    if _KERNELIZE_BY_DEFAULT:
        model = _cpu_layers(copy.deepcopy(model), "INFERENCE")
    x = pixels()
    with torch.no_grad():
        expected = model(x, output_hidden_states=True)
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, InternImageConfig)
    classifier = AutoModelForImageClassification.from_pretrained(folder).eval()
    base = AutoModel.from_pretrained(folder).eval()
    backbone = InternImageBackbone.from_pretrained(folder, out_features=["stage1", "stage2", "stage3", "stage4"])
    assert isinstance(classifier, InternImageForImageClassification) and isinstance(base, InternImageModel)
    backbone_from_config = AutoBackbone.from_config(config)
    assert isinstance(backbone_from_config, InternImageBackbone)
    with torch.no_grad():
        assert torch.equal(classifier(x).logits, expected.logits)
        out = base(x, output_hidden_states=True)
        assert torch.equal(out.pooler_output, model.internimage(x).pooler_output)
        assert len(out.hidden_states) == 5 and out.last_hidden_state.shape == (2, 128, 2, 2)
        maps = backbone.eval()(x).feature_maps
    for fmap, hidden in zip(maps, expected.hidden_states[1:]):
        assert torch.equal(fmap, hidden)
    assert backbone.channels == [16, 32, 64, 128]


def test_pipeline_returns_label_names(saved_model):
    folder, _ = saved_model
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__.startswith("BitImageProcessor")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    classify = pipeline("image-classification", model=str(folder))
    result = classify(image, top_k=3)
    assert {r["label"] for r in result} == set(LABELS.values())
    assert abs(sum(r["score"] for r in result) - 1) < 1e-5


def test_head_swap_for_fine_tuning(saved_model):
    folder, model = saved_model
    swapped = AutoModelForImageClassification.from_pretrained(folder, num_labels=5, ignore_mismatched_sizes=True)
    assert swapped.classifier.out_features == 5
    assert torch.equal(swapped.internimage.embeddings.conv1.weight, model.internimage.embeddings.conv1.weight)


@pytest.mark.parametrize(
    "problem, labels",
    [
        ("single_label_classification", torch.tensor([0, 2])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ],
)
def test_losses(problem, labels):
    model = InternImageForImageClassification(tiny_config(problem_type=problem))
    out = model(pixels(), labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()


def test_regression_loss():
    model = InternImageForImageClassification(tiny_config(num_labels=1, id2label=None, label2id=None))
    out = model(pixels(), labels=torch.tensor([0.5, -1.0]))
    assert out.loss.ndim == 0 and model.config.problem_type == "regression"


def test_tuple_outputs():
    model = InternImageForImageClassification(tiny_config()).eval()
    logits, hidden = model(pixels(), output_hidden_states=True, return_dict=False)
    assert logits.shape == (2, 3) and len(hidden) == 5


def test_official_initialisation():
    model = InternImageForImageClassification(tiny_config(layer_scale=1e-5, post_norm=True))
    for layer in model.internimage.encoder.levels[0].layers:
        assert torch.count_nonzero(layer.dcn.offset.weight) == 0 and torch.count_nonzero(layer.dcn.mask.bias) == 0
        assert torch.allclose(layer.layer_scale1, torch.full_like(layer.layer_scale1, 1e-5))
        assert layer.dcn.input_proj.weight.std() > 0


@pytest.mark.parametrize(
    "variant_overrides",
    [
        {},
        dict(
            use_clip_projector=True,
            center_feature_scale=True,
            dw_kernel_size=5,
            res_post_norm=True,
            level2_post_norm=True,
            level2_post_norm_block_ids=[1],
        ),
    ],
)
def test_bfloat16_model_runs_and_matches(variant_overrides):
    model = randomise(InternImageForImageClassification(tiny_config(**variant_overrides))).eval()
    x = pixels()
    with torch.no_grad():
        ref = model(x).logits
        low = copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16)).logits
    assert low.dtype == torch.bfloat16
    assert rel_err(low, ref) < 5e-2


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = randomise(InternImageForImageClassification(tiny_config(drop_path_rate=0.0)))
    model.train()
    x, labels = pixels(), torch.tensor([0, 1])
    # BatchNorm in train mode updates running stats; compare on identical copies.
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    # transformers 5.23 renamed gradient -> activation checkpointing; older 5.x only has the old name.
    enable = (
        getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable
    )
    enable()
    assert all(
        layer.gradient_checkpointing
        for layer in checkpointed.modules()
        if isinstance(layer, internimage_hf.modeling_internimage.InternImageLayer)
    )
    plain(x, labels=labels).loss.backward()
    checkpointed(x, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 64, 64), "shape \\(batch, 3, height, width\\)"),
        (torch.randn(1, 1, 64, 64), "3 channels"),
        (torch.randn(1, 64, 64, 3), "channels-last"),
        (torch.randn(1, 3, 16, 16), "at least 32x32"),
        (torch.randint(0, 255, (1, 3, 64, 64)), "floating-point"),
    ],
)
def test_bad_pixel_values(x, message):
    model = InternImageForImageClassification(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(x)


def test_h_g_inputs_must_be_multiples_of_32():
    model = InternImageForImageClassification(tiny_config(use_clip_projector=True)).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 80, 64))
    assert model(torch.randn(1, 3, 96, 64)).logits.shape == (1, 3)
    # the backbone has no such constraint
    backbone = InternImageBackbone(tiny_config(use_clip_projector=True))
    assert backbone(torch.randn(1, 3, 80, 72)).feature_maps[-1].shape[-2:] == (3, 3)


def test_odd_input_sizes_work_for_conv_head_variants():
    model = InternImageForImageClassification(tiny_config()).eval()
    assert model(torch.randn(1, 3, 97, 45)).logits.shape == (1, 3)


def _cpu_layers(model, mode):
    """The model kernelized for the CPU (oneDNN Linear/MLP layers), as `from_pretrained` leaves it."""
    from kernels import Mode, kernelize

    return kernelize(model, device="cpu", mode=getattr(Mode, mode))


def test_cpu_inference_layers_agree_with_plain_pytorch():
    """oneDNN linear + fused GELU (kernelized CPU layers) change nothing beyond float32 rounding."""
    from internimage_hf.ops import cpu_layers

    plain_model = randomise(InternImageForImageClassification(tiny_config())).eval()
    model = _cpu_layers(copy.deepcopy(plain_model), "INFERENCE")
    assert model.internimage.encoder.levels[0].layers[0].mlp.forward.__func__ is cpu_layers.OneDNNMLP.forward
    x = pixels()
    with torch.no_grad():
        assert cpu_layers.onednn_linear_dtype(x.permute(0, 2, 3, 1), model.classifier.weight) == (
            torch.float32 if cpu_layers._onednn_linear_op() is not None and cpu_layers._onednn_float32() else None
        )
        fast = model(x, output_hidden_states=True)
        plain = plain_model(x, output_hidden_states=True)
    assert rel_err(fast.logits, plain.logits) < 1e-5
    for a, b in zip(fast.hidden_states, plain.hidden_states):
        assert rel_err(a, b) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 inference on oneDNN, where it has bf16
        with torch.no_grad():
            bf16_native = cpu_layers._onednn_bf16()
            assert (cpu_layers.onednn_linear_dtype(x, model.classifier.weight) is not None) == bf16_native
        assert cpu_layers.onednn_linear_dtype(x, model.classifier.weight) is None  # training keeps F.linear


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_under_bf16_autocast_casts_like_f_linear(input_dtype, weight_dtype, gelu):
    """Under bf16 autocast F.linear casts input, weight and bias to bf16 whatever their dtypes; so does the CPU
    layers' linear (a bf16 model fed float32 pixels once reached oneDNN with mixed dtypes and failed)."""
    from internimage_hf.ops import cpu_layers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 16, generator=g).to(input_dtype)
    weight = torch.randn(24, 16, generator=g).to(weight_dtype)
    bias = torch.randn(24, generator=g).to(weight_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_layers.linear(x, weight, bias, gelu=gelu)
        expected = torch.nn.functional.linear(x, weight, bias)
        expected = torch.nn.functional.gelu(expected) if gelu else expected
    assert out.dtype == expected.dtype == torch.bfloat16 and out.shape == expected.shape
    assert rel_err(out.float(), expected.float()) < 2e-2  # bf16 GEMMs summing in different orders


def test_cpu_layers_step_aside_for_compile_and_adapters():
    """Mode.TORCH_COMPILE keeps the plain layers; a hooked fc1 (e.g. an adapter) is called, not bypassed."""
    from kernels import Mode, kernelize

    from internimage_hf.modeling_internimage import InternImageMLP

    model = randomise(InternImageForImageClassification(tiny_config())).eval()
    kernelize(model, device="cpu", mode=Mode.INFERENCE | Mode.TORCH_COMPILE)
    mlp = next(m for m in model.modules() if isinstance(m, InternImageMLP))
    assert "forward" not in mlp.__dict__ or mlp.forward.__func__ is InternImageMLP.forward
    _cpu_layers(model, "INFERENCE")
    calls = []
    handle = mlp.fc1.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.no_grad():
        model(pixels())
    handle.remove()
    assert calls  # the hook ran: the fused path was not taken for this MLP


def test_cpu_training_layers_gradients_match_float64():
    """The oneDNN training path is as accurate as plain PyTorch, judged against a float64 run."""
    model = randomise(InternImageForImageClassification(tiny_config())).train()
    x, labels = pixels(), torch.tensor([0, 2])

    def gradient(m, inputs):
        m(inputs, labels=labels).loss.backward()
        return torch.cat([p.grad.flatten().double() for p in m.parameters()])

    exact = gradient(copy.deepcopy(model).double(), x.double())
    fast = gradient(_cpu_layers(copy.deepcopy(model), "TRAINING"), x)
    plain = gradient(copy.deepcopy(model), x)
    # Randomised deformable offsets amplify float32 rounding to ~2e-5 here, on either path.
    assert rel_err(plain, exact) < 1e-4
    assert rel_err(fast, exact) < max(3 * rel_err(plain, exact), 1e-6)


@pytest.mark.parametrize("capability", ["AVX512", "AVX2", "NO AVX", "DEFAULT", "SVE256"])
def test_float32_gemm_path_follows_the_machine(monkeypatch, capability):
    """float32 Linears run on oneDNN except on x86 CPUs without AVX-512, where F.linear (MKL) measured faster; the
    kernelized model then makes no oneDNN call in inference and still agrees with plain PyTorch."""
    from internimage_hf.ops import cpu_layers

    if cpu_layers._onednn_linear_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu_layers._onednn_float32.cache_clear()
    try:
        onednn = cpu_layers._onednn_float32()
    finally:
        cpu_layers._onednn_float32.cache_clear()
    assert onednn == (capability not in ("AVX2", "NO AVX"))

    monkeypatch.setattr(cpu_layers, "_onednn_float32", lambda: onednn)
    calls = []
    op = cpu_layers._onednn_linear_op()
    monkeypatch.setattr(cpu_layers, "_onednn_linear_op", lambda: lambda *args: calls.append(1) or op(*args))
    plain_model = randomise(InternImageForImageClassification(tiny_config())).eval()
    model = _cpu_layers(copy.deepcopy(plain_model), "INFERENCE")
    with torch.no_grad():
        fast, plain = model(pixels()).logits, plain_model(pixels()).logits
    assert bool(calls) == onednn
    assert rel_err(fast, plain) < 1e-5


@pytest.mark.parametrize("onednn", [True, False])
def test_cpu_training_mlp_keeps_no_gelu_output_and_gives_the_same_gradients(monkeypatch, onednn):
    """The training MLP layer saves fc1's input and output, not GELU's output (recomputed in backward): the MLP's
    saved activations are 5C wide per token instead of 9C, on either float32 GEMM path. Its gradients are those of
    the unfused path (fc1 and fc2 as separate Linears on the same GEMMs, F.gelu between), bit for bit, and within
    float32 of float64."""
    from internimage_hf.modeling_internimage import InternImageMLP
    from internimage_hf.ops import cpu_layers

    if onednn and cpu_layers._onednn_linear_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(cpu_layers, "_onednn_float32", lambda: onednn)

    mlp = InternImageMLP(tiny_config(), 16).train()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    x = torch.randn(2, 5, 6, 16, generator=generator)
    grad_out = torch.randn(2, 5, 6, 16, generator=generator)

    def run(module, inputs, forward):
        module.zero_grad()
        inputs = inputs.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = forward(module, inputs)
        out.backward(grad_out.to(out.dtype))
        weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
        activations = sum(t.numel() for t in saved if t.untyped_storage().data_ptr() not in weights)
        return [inputs.grad] + [p.grad for p in module.parameters()], activations

    def unfused(m, inputs):
        hidden = cpu_layers.linear(inputs, m.fc1.weight, m.fc1.bias)
        return cpu_layers.linear(torch.nn.functional.gelu(hidden), m.fc2.weight, m.fc2.bias)

    fused_grads, fused_saved = run(mlp, x, cpu_layers.OneDNNMLP.forward)
    unfused_grads, unfused_saved = run(mlp, x, unfused)
    exact_grads, _ = run(copy.deepcopy(mlp).double(), x.double(), lambda m, inputs: m(inputs))
    tokens = x[..., 0].numel()
    assert unfused_saved == tokens * (16 + 64 + 64)  # fc1's input, GELU's input, fc2's input
    assert fused_saved == tokens * (16 + 64)
    for fused, unfused, exact in zip(fused_grads, unfused_grads, exact_grads):
        assert torch.equal(fused, unfused)
        assert rel_err(fused.double(), exact) < 1e-5


@pytest.mark.parametrize(("core_op", "backend"), [("DCNv3", "auto"), ("DCNv3", "reference"), ("DCNv4", "auto")])
def test_compile_with_dynamic_shapes_traces_the_whole_model(monkeypatch, core_op, backend):
    """torch.compile(model, dynamic=True, fullgraph=True), as detection users compile for varying image sizes:
    Dynamo traces a module's float attributes (offset_scale) as symbolic floats, and the DCN ops' argument checks
    once called math.isfinite on them, which fails the trace. AOT's eager backend (the graph that Dynamo and
    functionalisation give; torch 2.13's inductor then fails lowering the strided convolutions of such a graph with
    a ValueRangeError of its own) must reproduce eager for two batch sizes and resolutions. The model is kernelized
    as `from_pretrained` leaves it (its CPU layers step aside while tracing; they once queried the CPU first, which
    Dynamo cannot trace). DCNv4's reference shares DCNv3's checks."""
    monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", backend)
    config = tiny_config(core_op=core_op, depths=[1, 1, 1, 1], **({"dw_kernel_size": 3} if core_op == "DCNv4" else {}))
    model = _cpu_layers(randomise(InternImageForImageClassification(config)).eval(), "INFERENCE")
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
        with torch.no_grad():
            for n, size in ((2, 64), (3, 96)):
                x = pixels(n=n, h=size, w=size)
                assert rel_err(compiled(x).logits, model(x).logits) < 1e-5
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("core_op", ["DCNv3", "DCNv4"])
def test_inductor_keeps_features_channels_innermost(core_op):
    """torch.compile on the CPU: inductor's layout optimisation gives every 4-D tensor upstream of a convolution
    `channels_last` strides computed from its own shape, as if dim 1 were channels. An (N, H, W, C) feature map
    so laid out has H innermost: every LayerNorm then reduces over strided channels and every GEMM input is
    transposed (compiled InternImage-T ran at 0.77x its eager speed). The blocks carry (N, H*W, C) tokens, so no
    buffer of the compiled code may be 4-D with a spatial size in dim 1 and stride 1 there. (Inference only: a
    training graph still lays out the 4-D op inputs it saves for backward that way, bench/README.md.)"""
    from torch._inductor.utils import run_and_get_code

    config = tiny_config(
        core_op=core_op, depths=[1, 1, 1, 1], image_size=160, **({"dw_kernel_size": 3} if core_op == "DCNv4" else {})
    )
    channels = {config.num_channels, config.channels // 2, config.channels, *config.hidden_sizes}
    spatial = {160 // 2**k for k in range(1, 6)}
    assert not channels & spatial  # sizes chosen so that a buffer's dim 1 tells channels from rows
    model = randomise(InternImageForImageClassification(config)).eval()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            _, codes = run_and_get_code(torch.compile(model, fullgraph=True), pixels(h=160, w=160))
    finally:
        torch._dynamo.reset()
    # Every 4-D (size, stride) pair in the code: allocations, reinterpretations of reused buffers, stride asserts.
    buffers = [
        (tuple(int(v) for v in size.split(",")), tuple(int(v) for v in stride.split(",")))
        for code in codes
        for size, stride in re.findall(r"\((\d+, \d+, \d+, \d+)\), \((\d+, \d+, \d+, \d+)\)", code)
    ]
    assert len(buffers) > 10  # the pattern still matches inductor's code
    wrong = [(size, stride) for size, stride in buffers if stride[1] == 1 and size[1] in spatial and size[3] > 1]
    assert not wrong, f"feature maps laid out with a spatial dimension innermost: {wrong}"
