"""Lightning: the systems (LightningModules) and what runs around them.

- :mod:`~wsss.systems.classifier`: :class:`ClassifierSystem`, trains the CAM classifier (``train-cls``).
- :mod:`~wsss.systems.segmenter`: :class:`SegmenterSystem`, trains DeepLab-LargeFOV (``train-seg``).
- :mod:`~wsss.systems.predictors`: the predict-only modules of ``cams``, ``pseudo-labels`` and ``predict-seg``.
- :mod:`~wsss.systems.writers`: prediction writers, one file per image, atomic.
- :mod:`~wsss.systems.callbacks`: resume points between validations, an images/s progress bar.
- :mod:`~wsss.systems.checkpoints`: reading and writing checkpoints safely, loading a trained model.
- :mod:`~wsss.systems.schedules`: the learning-rate schedules both systems use.
"""
