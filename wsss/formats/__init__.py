"""One module per on-disk format: what the stages, the data layer and the report read and write.

- :mod:`wsss.formats.images`: input images (``read_image``, ``image_info``).
- :mod:`wsss.formats.label_png`: label maps as index/palette PNGs (GT masks, pseudo-labels, predictions).
- :mod:`wsss.formats.cams`: CAM files, ``<id>.npz`` (ours) or ``<id>.npy`` (IRN's layout): write, read and validate, lookup.
- :mod:`wsss.formats.irn`: IRN's pickled ``.npy`` files (CAM dicts, ``cls_labels.npy``), read without running pickled code.
- :mod:`wsss.formats.torch_files`: checkpoints and weight files, ``torch.load(weights_only=True)`` with errors naming the file.
"""
