"""DCNv3 operator: one entry point (`dcnv3_core`), a compiled fast path and the pure-PyTorch reference."""

from .compiled import DCNv3KernelWarning
from .dispatch import DCNv3Core, dcnv3_core, resolve_backend
from .loader import kernel_status
from .reference import dcnv3_core_reference, dcnv3_output_size

__all__ = [
    "DCNv3Core",
    "DCNv3KernelWarning",
    "dcnv3_core",
    "dcnv3_core_reference",
    "dcnv3_output_size",
    "kernel_status",
    "resolve_backend",
]
