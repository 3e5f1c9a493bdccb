"""Training: `train.fit` (one loop for 1 or S seeds, early stopping, frozen-prefix caching,
resume), the jitted programs it runs (`programs`), the hook protocol methods plug in through
(`hooks`), verified Orbax checkpoints (`checkpoint`), data parallelism (`parallel`) and the
cached source pretraining (`pretrain`).

Internals: `loop` (the epoch loop, which names no method), `stage` (planning a stage),
`ledger` (per-seed records, early stopping, `FitResult`), `method_hooks` (the probe, DELTA,
WiSE-FT and soups as hooks), `attention` and `weight_space` (what those hooks compute).
"""

__all__ = ["checkpoint", "hooks", "parallel", "pretrain", "programs", "train"]
