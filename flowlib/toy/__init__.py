"""The offline default model, `toy-llava`: its architecture and the recipe that trained it.

One module per job, in the order a run uses them:

| module | job |
|---|---|
| `model` | the architecture (`ToyConfig`), vocabulary and answer format; `build_toy_model` |
| `recipe` | every training setting (`TrainConfig`), the learning-rate schedule, the stream's seeds |
| `patches` | what each image token should say (`patch_labels`) and the loss that teaches it (`PatchLoss`) |
| `turns` | the training-only conversation turns: named queries and the scene description |
| `stream` | the training stream: chunk k encoded, inline or by worker processes; batches |
| `vision_pretrain` | the vision tower and projector trained alone first |
| `step` | one step's forward pass (shared system prompt computed once) and losses |
| `state` | the saved state an interrupted run resumes from |
| `training` | `train()`: the run as a sequence of those steps |
| `evaluation`, `card` | the held-out measures and targets; the model card and saved files |
| `__main__` | the command line: `python -m flowlib.toy` |

Retraining and what the recipe's alternatives measured: docs/toy-model.md.
"""
