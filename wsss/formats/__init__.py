"""One module per on-disk format: what the stages, the data layer and the report read and write.

- :mod:`wsss.formats.images`: input images (``read_image``, ``image_info``).
- :mod:`wsss.formats.label_png`: label maps as index, palette or grayscale PNGs (GT masks, pseudo-labels, predictions).
- :mod:`wsss.formats.cams`: CAM files, ``<id>.npz`` (ours) or ``<id>.npy`` (IRN's or PSA's layout, told apart by the dict's keys): write, read and validate, lookup.
- :mod:`wsss.formats.irn`: IRN's pickled ``.npy`` files (CAM dicts with the stride-4 ``cam``, ``cls_labels.npy``), read without running pickled code.
- :mod:`wsss.formats.psa`: PSA's CAM dicts ``{class index: map}``.
- :mod:`wsss.formats.torch_files`: checkpoints and weight files, ``torch.load(weights_only=True)`` with errors naming the file.
"""
