"""DCNv3 and DCNv4 operators: one entry point each (`dcnv3_core`, `dcnv4_core`), compiled fast paths and the
pure-PyTorch references.

Importing this package registers the kernel mappings of `DCNv3Core` and `DCNv4Core` with `kernels`
(`hub.register()`: no file is read and no request made until a model is kernelized) and the CPU Linear/MLP layers
of `cpu_layers`."""

from . import cpu_layers, hub
from .compiled import DCNv3KernelWarning
from .dispatch import DCNv3Core, DCNv4Core, dcnv3_core, dcnv4_core, resolve_backend, use_reference
from .loader import kernel_status
from .reference import dcnv3_core_reference, dcnv3_output_size, dcnv4_core_reference, dcnv4_offset_mask_channels

hub.register()
cpu_layers.register()

__all__ = [
    "DCNv3Core",
    "DCNv3KernelWarning",
    "DCNv4Core",
    "dcnv3_core",
    "dcnv3_core_reference",
    "dcnv3_output_size",
    "dcnv4_core",
    "dcnv4_core_reference",
    "dcnv4_offset_mask_channels",
    "kernel_status",
    "resolve_backend",
    "use_reference",
]
