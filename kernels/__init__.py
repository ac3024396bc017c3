"""Triton kernels and their launch wrappers, installed as ``coatnet_fast.kernels``.

One module per op, named as the op (``rel_bias_attention``, ``dwconv_bn_gelu``). Nothing here
is imported when ``coatnet_fast`` is imported: Triton loads only when a kernel is first used.
"""
