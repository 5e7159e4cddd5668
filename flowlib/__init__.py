"""flowlib: cross-modal information flow in LLaVA-style models (companion to arXiv 2411.18620).

One module per responsibility, dependencies running one way:
`config` <- `sample` <- `geometry` <- `layout` <- `models` (<- `kernels`, <- `tiny`) <- `data`,
`flows` <- `knockout` / `sweep` / `lens` <- `answers` / `run_plan` <- `runner` <- `plots` <- `widgets`.
"""

__version__ = "0.1.0"
