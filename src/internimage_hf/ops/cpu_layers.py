"""CPU layers that `kernels.kernelize` swaps in for InternImage's Linear and MLP: GEMMs on oneDNN where it is the
faster path on this machine, the MLP's GELU fused into its first GEMM (inference) or recomputed in backward instead of
saved (training).

The modeling file uses plain `nn.Linear`/`nn.GELU` (decorated `use_kernel_forward_from_hub("InternImageLinear")` and
`("InternImageMLP")`); `register()` maps those names, on cpu, for the inference and training modes, to the layers
below. `AutoModel*.from_pretrained` kernelizes by default (transformers >= 5.25), otherwise call
`kernels.kernelize(model, device="cpu", mode=Mode.INFERENCE)`; `Mode.TORCH_COMPILE` keeps the plain layers (inductor
picks its own GEMMs). Which GEMM runs float32 is a fact of the machine (`_onednn_float32`): oneDNN's linear (the
kernel inductor's CPU freezing uses, and it can fuse GELU), except on x86 CPUs without AVX-512, which keep F.linear
(MKL).

Every call reads the module's current weight (nothing is packed or cached, so no edit can go stale) and decides
from the call alone (device, dtype, autocast, grad mode, tracing) and the machine: no process state. Where oneDNN does
not apply the layers compute exactly what the plain modules do.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import _exporting

LINEAR_LAYER = "InternImageLinear"
MLP_LAYER = "InternImageMLP"


def _onednn_linear_op():
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


@functools.cache
def _onednn_bf16() -> bool:
    """oneDNN runs bfloat16 natively only on CPUs with AVX-512 BF16 / AMX (a fact of the machine)."""
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


@functools.cache
def _onednn_float32() -> bool:
    """Whether float32 Linears run on oneDNN's linear rather than F.linear (MKL): not on x86 CPUs whose best
    instruction set torch dispatches to is AVX2 or older. Measured on InternImage-T's GEMMs in the whole model
    (bench/README.md, 2026-12-07, AMD EPYC, same process): with AVX-512, oneDNN ran the forward 7-10% faster than
    F.linear; with both libraries held to AVX2, F.linear ran it 0-12% faster. Decided by the machine (and torch's
    ATEN_CPU_CAPABILITY), so every process on it computes alike."""
    return torch.backends.cpu.get_cpu_capability() not in ("AVX2", "NO AVX")


def _tracing() -> bool:
    """jit tracing, torch.compile and exports (`dispatch._exporting`) get the plain ops every tool knows."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or _exporting())


def onednn_linear_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a Linear runs in on oneDNN's linear, or None where it uses F.linear: float32 on CPUs where oneDNN
    is the faster path (`_onednn_float32`) and bfloat16 on CPUs with native bf16; under bfloat16 autocast, inference
    only. Tracing and export keep F.linear. (Called for every Linear: the cheap tests come first, then the tracing
    probes, then the machine's cached facts.)"""
    if x.device.type != "cpu" or _onednn_linear_op() is None:
        return None
    if torch.is_autocast_enabled("cpu"):
        if torch.is_grad_enabled() or torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        if not (x.is_floating_point() and weight.is_floating_point()):
            return None
        dtype = torch.bfloat16
    elif x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    else:
        dtype = x.dtype
    # The machine's facts only after the tracing probes: Dynamo cannot trace the capability queries behind them (a
    # kernelized model under torch.compile would fail fullgraph, or break its graph at every Linear).
    if _tracing():
        return None
    native = _onednn_bf16() if dtype == torch.bfloat16 else _onednn_float32()
    return dtype if native else None


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _onednn_linear_op()(x, weight, bias, "none", [], "")


def _gemm(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    return _onednn_linear(x2d, weight, bias) if onednn else F.linear(x2d, weight, bias)


def _linear_backward(grad: torch.Tensor, x2d, weight: torch.Tensor, has_bias: bool, needs, onednn: bool) -> tuple:
    """Gradients of x2d W^T + b for the three inputs `needs` flags: the input's on oneDNN (or torch.mm), the
    weight's on torch.mm (faster for its long reduction). `x2d` is read only for the weight's."""
    grad_x = None
    if needs[0]:
        grad_x = _onednn_linear(grad, weight.t().contiguous()) if onednn else grad.mm(weight)
    grad_w = grad.t().mm(x2d) if needs[1] else None
    grad_b = grad.sum(0) if has_bias and needs[2] else None
    return grad_x, grad_w, grad_b


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b on oneDNN (gradients: `_linear_backward`)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias):
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x2d, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x2d, weight = ctx.saved_tensors
        return _linear_backward(grad.contiguous(), x2d, weight, ctx.has_bias, ctx.needs_input_grad, True)


class _MLPFunction(torch.autograd.Function):
    """fc2(GELU(fc1(x))) for training, on oneDNN or (`onednn` False) F.linear, with the ops the unfused layers use
    (the same gradients, bit for bit), saving x and fc1's output only: GELU's output, the MLP's other 4C-wide
    activation, is recomputed in backward for fc2's weight gradient instead of kept (a quarter of what a block
    saves; one GELU pass more)."""

    @staticmethod
    def forward(ctx, x2d, weight1, bias1, weight2, bias2, onednn):
        hidden = _gemm(x2d, weight1, bias1, onednn)
        ctx.save_for_backward(x2d, hidden, weight1, weight2)
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        ctx.onednn = onednn
        return _gemm(F.gelu(hidden), weight2, bias2, onednn)

    @staticmethod
    def backward(ctx, grad):
        x2d, hidden, weight1, weight2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        fc1_needs = needs[:3]
        grad_gelu, grad_w2, grad_b2 = _linear_backward(
            grad.contiguous(),
            F.gelu(hidden) if needs[3] else None,
            weight2,
            ctx.has_bias[1],
            (any(fc1_needs), needs[3], needs[4]),
            ctx.onednn,
        )
        if not any(fc1_needs):  # fc1 and the input frozen: nothing flows further back
            return None, None, None, grad_w2, grad_b2, None
        grad_hidden = torch.ops.aten.gelu_backward(grad_gelu, hidden)
        fc1_grads = _linear_backward(grad_hidden, x2d, weight1, ctx.has_bias[0], fc1_needs, ctx.onednn)
        return *fc1_grads, grad_w2, grad_b2, None


def _requires_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """F.linear (then GELU if asked) on oneDNN where it applies (`onednn_linear_dtype`), else in plain PyTorch."""
    dtype = onednn_linear_dtype(x, weight)
    if dtype is None:
        out = F.linear(x, weight, bias)
        return F.gelu(out) if gelu else out
    if _requires_grad(x, weight, bias):
        # never under autocast (`onednn_linear_dtype`): x, weight and bias have one dtype throughout
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = _OneDNNLinearFunction.apply(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])
        return F.gelu(out) if gelu else out
    if x.dtype != dtype:  # bf16 autocast inference casts input, weight and bias as F.linear would
        x = x.to(dtype)
    if weight.dtype != dtype:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    # oneDNN's linear takes the (..., in) input as it is (no reshape or view: each costs microseconds, and a
    # forward makes about 180 of these calls); GELU, when asked, is fused into the GEMM.
    if gelu:
        return _onednn_linear_op()(x, weight, bias, "gelu", [None], "none")
    return _onednn_linear(x, weight, bias)


def _plain_linear(module: nn.Module) -> bool:
    """Whether `module` computes exactly F.linear(x, weight, bias): an nn.Linear without a forward of its own and
    without hooks (an adapter such as a LoRA wrapper, a quantised Linear or a hook is called as it is instead)."""
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    own = module.__dict__.get("forward")  # where `kernelize` put a layer's forward
    if own is not None and getattr(own, "__func__", None) not in (nn.Linear.forward, OneDNNLinear.forward):
        return False
    hooks = nn.modules.module
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def _exact_gelu(module: nn.Module) -> bool:
    return type(module) is nn.GELU and module.approximate == "none"


class OneDNNLinear(nn.Module):
    """Replaces `InternImageLinear.forward` (an nn.Linear): the same computation on oneDNN where it applies."""

    has_backward = True
    can_torch_compile = False  # compiled graphs keep the plain Linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


class OneDNNMLP(nn.Module):
    """Replaces `InternImageMLP.forward` (fc1, act, dropout, fc2, dropout): in inference fc1 and the exact GELU as
    one oneDNN call (where oneDNN runs the Linears); in training (no active dropout, no autocast) the whole MLP as
    `_MLPFunction`, which saves no GELU output. Adapted or hooked sub-modules are called as they are, so nothing
    attached to them is bypassed."""

    has_backward = True
    can_torch_compile = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        fused = _plain_linear(fc1) and _exact_gelu(self.act)
        if (
            fused
            and _plain_linear(fc2)
            and (self.dropout.p == 0 or not self.dropout.training)
            and _requires_grad(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
            and x.device.type == "cpu"
            and x.dtype == fc1.weight.dtype == fc2.weight.dtype
            and not torch.is_autocast_enabled("cpu")
            and not _tracing()
        ):
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            onednn = onednn_linear_dtype(x, fc1.weight) is not None
            out = _MLPFunction.apply(flat, fc1.weight, fc1.bias, fc2.weight, fc2.bias, onednn)
            return out.view(*x.shape[:-1], fc2.weight.shape[0])
        if fused:
            x = linear(x, fc1.weight, fc1.bias, gelu=True)
        else:
            x = self.act(self.fc1(x))
        return self.dropout(self.fc2(self.dropout(x)))


class _InPackageRepository:
    """A `kernels` repository (its protocol: `layer_name`, `load()`) for a layer defined in this package."""

    def __init__(self, layer: type[nn.Module], layer_name: str):
        self.layer_name = layer_name
        self._layer = layer

    def load(self) -> type[nn.Module]:
        return self._layer

    def __str__(self) -> str:
        return f"internimage_hf CPU layer {self._layer.__name__}"

    def __copy__(self):  # kernels deep-copies inherited mappings; the repository is immutable
        return self

    def __deepcopy__(self, memo):
        return self


def kernel_mapping() -> dict:
    """{layer name: {"cpu": {mode: repository}}} for the inference and training modes."""
    from kernels import Mode

    mapping = {}
    for layer, name in ((OneDNNLinear, LINEAR_LAYER), (OneDNNMLP, MLP_LAYER)):
        repo = _InPackageRepository(layer, name)
        mapping[name] = {"cpu": {Mode.INFERENCE: repo, Mode.TRAINING: repo}}
    return mapping


def register() -> bool:
    """Add the CPU layers to `kernels`' global mapping (on import of internimage_hf.ops); False if `kernels` is
    missing or refuses them (the modules then keep their plain forward)."""
    try:
        from kernels import register_kernel_mapping

        register_kernel_mapping(kernel_mapping())
    except Exception:  # a kernels release without this API or these modes
        return False
    return True


__all__ = ["OneDNNLinear", "OneDNNMLP", "kernel_mapping", "linear", "onednn_linear_dtype", "register"]
