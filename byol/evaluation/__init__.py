"""Evaluation protocols, one evaluator per protocol (big_vision style).

Each evaluator is built from an embedding function and its settings and run
on parameters and state: `Evaluator(embed, **cfg).run(params, state)`.

- `linear.LinearEvaluator`: linear heads on a frozen encoder, one per
  learning rate of a grid, the rate chosen on VALID (the paper's protocol),
  or one rate on TRAIN_AND_VALID (DeepMind's code defaults).
- `finetune.FineTuneEvaluator`: the encoder trained with the head
  (DeepMind's `freeze_backbone=False`).
- `probe.ProbeEvaluator`: the fast protocol, logistic regression and kNN on
  cached features.

`features` builds the embedding functions and caches features; `loop` holds
what the supervised protocols share; `sources` reads a pretraining workdir.
`byol/eval_experiment.py` is the command that picks the evaluator named by
the config and writes its results.
"""
