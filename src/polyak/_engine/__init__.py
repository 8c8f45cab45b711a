"""The offline engine: order and check members, stream them through the kernels, write the
result (one process, worker threads or torch.distributed ranks), inspect checkpoints.

Private: the public names are re-exported by :mod:`polyak`.
"""
