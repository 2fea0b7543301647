"""heinfer's compiler. `compile_torch` (needs the torch extra) is imported lazily: importing
the compiler never imports torch."""


def compile_torch(*args, **kwargs):
    """See heinfer_packing.torch_import.compile_torch."""
    from heinfer_packing.torch_import import compile_torch as impl

    return impl(*args, **kwargs)
