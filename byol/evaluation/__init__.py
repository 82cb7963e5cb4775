"""Evaluators: one per measurement of a network, built by name from the config.

Every evaluator is built by `registry.build(name, config, network)` from its
own settings and the pretrained `model.Network`, and run as
`evaluator.run(params, state) -> dict` (big_vision style). The table of names
is `registry.EVALUATORS`:

- `linear` (`linear.LinearEvaluator`): linear heads on a frozen encoder, one
  per learning rate of a grid, the rate chosen on VALID (the paper's
  protocol), or one rate on TRAIN_AND_VALID (DeepMind's code defaults).
- `finetune` (`finetune.FineTuneEvaluator`): the encoder trained with the
  head (DeepMind's `freeze_backbone=False`).
- `fast` (`probe.ProbeEvaluator`): the fast protocol, logistic regression and
  kNN on cached features; `probe.probe_report` compares a trained and an
  initial encoder with it.
- `online_classifier` (`online_classifier.OnlineClassifierEvaluator`): the
  online classifier's TEST accuracy.
- `collapse` (`collapse.CollapseEvaluator`): proj_std and RankMe on a fixed
  batch.

The first three run after pretraining (`byol/eval_experiment.py`, the
evaluation command, picks one by `config.mode`); the last two run during
pretraining, every N steps of `config.evaluators.schedule`
(`byol/train_loop.py`). `features` runs an encoder over a split and
calibrates BatchNorm; `loop` holds what the evaluators share (the
supervised step loop, top-k accuracy); `sources` reads a pretraining
workdir.
"""
