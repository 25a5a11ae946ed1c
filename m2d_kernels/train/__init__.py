"""Training and evaluation for 2D Matryoshka embedding models (needs the [train] extra).

- :mod:`~m2d_kernels.train.loop`: ``TrainConfig`` and ``train``, the thin training loop.
- :mod:`~m2d_kernels.train.data`: pair/triplet files, the built-in docstring pairs, the public sets of a data folder.
- :mod:`~m2d_kernels.train.evaluate`: the layer x dim grids (STS Spearman, retrieval), tables, heat maps.
- :mod:`~m2d_kernels.train.cli`: the ``m2d-train`` command.
"""
