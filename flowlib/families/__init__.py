"""Model-family adapters: the protocol and one module per family, plus what tests need to check a new one.

- `base`: `FamilyAdapter`, the protocol every family implements (docs/adapters.md);
- `llava`, `qwen_vl`, `onevision`: LLaVA-1.5 / LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision;
- `processors`: image-only processors for families whose processor also wants torchvision's video part;
- `tiny`, `released`: tiny random models built offline, and the released 7B checkpoints' config numbers;
- `oracle`: the geometric oracle that checks an adapter's box -> image-token mapping.

`flowlib.models.adapter_for` picks an adapter by config class; `flowlib.models.register_family` adds one.
"""
