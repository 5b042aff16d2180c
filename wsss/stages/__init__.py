"""One module per stage command, each with one typed function that its command and ``wsss run`` call:

- :mod:`~wsss.stages.train_classifier`: ``train_classifier(config)`` (``wsss train-cls``)
- :mod:`~wsss.stages.cams`: ``make_cams(...)`` (``wsss cams``)
- :mod:`~wsss.stages.pseudo_labels`: ``make_pseudo_labels(...)`` (``wsss pseudo-labels``)
- :mod:`~wsss.stages.train_segmenter`: ``train_segmenter(config)`` (``wsss train-seg``)
- :mod:`~wsss.stages.predict`: ``predict_segmentation(...)`` (``wsss predict-seg``)
- :mod:`~wsss.stages.evaluate`: ``evaluate_labels(...)`` (``wsss evaluate``)
- :mod:`~wsss.stages.eval_cams`: ``evaluate_cams(...)`` (``wsss eval-cams``)

Stages meet only through files and never import each other; :mod:`~wsss.stages.options` holds the
argument types their command lines share.
"""
