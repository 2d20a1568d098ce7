"""Put a fitted state to work: predict on new images (:mod:`fskd.deploy.predict`) and export the
encoder + the state's all-way head to one ONNX or TorchScript file (:mod:`fskd.deploy.export`).

Both start from :class:`fskd.deploy.classifier.Classifier`: the state's all-way head fitted on
the state's own K shots per class (its seed), over every class of its store, with the encoder the
store was extracted with rebuilt from the store's spec.
"""
