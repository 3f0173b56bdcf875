"""Finding a compiled DCNv3 kernel (placeholder until the kernels work lands: always the reference path)."""


def get_compiled_op(required: bool = False):
    if required:
        raise RuntimeError("No compiled DCNv3 kernel is available in this build of internimage_hf.")
    return None
