"""Encoders out: PyTorch (torchvision names, safetensors) and TF SavedModel.

  python -m byol.export --workdir=W --format=torch|savedmodel|all --out=DIR \
      [--encoder=online|target] [--checkpoint_step=N] [--heads] [--overwrite]

* `torch_layout`: Haiku parameters -> torchvision state dict (NumPy only).
* `torch_resnet`: the torch module that computes it (needs only torch; copied
  into every export folder).
* `savedmodel`: the project's own forward through jax2tf.
* `exporter`: checks, then an atomic write of the export folder.

Nothing is imported here, so that `byol.export.torch_resnet` loads without
JAX or TensorFlow.
"""
