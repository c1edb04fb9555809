"""Custom ops.

Each op lives in its own folder: ``__init__.py`` (the public function and module),
``reference.py`` (pure PyTorch: the specification and the CPU path), the kernel, and its
``torch.library`` registration under the ``turbox_mm::`` namespace.
"""
