"""Files and what a run loads: patched checkpoints and atomic writes (`checkpoint`), their manifests checked field by
field (`manifest`), integrity of harden's own files (`integrity`), resumable state and the polite stop
(`resume`), loading a model and data for a run (`session`), export to TorchScript / torch.export / ONNX
(`export`)."""
