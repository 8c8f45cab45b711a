"""``polyak demo``: the Polyak-averaging tutorial's experiment, end to end, with real files.

Modules: ``_data`` (the blobs, bit for bit as scikit-learn's ``make_blobs``), ``_train``
(Keras ``fit`` with ``CheckpointCallback``; the same recipe in PyTorch with
``CheckpointSaver``), ``_model`` (the MLP as numpy, for scoring averages),
``_experiment`` (one repetition: train, ``polyak.sweep``, ``polyak.select``), ``_summary``
and ``_show`` (repeats, text, figures, JSON), ``_run`` and ``_cli`` (the command). Nothing
here is imported by ``import polyak``; the frameworks are imported only when training.
"""
