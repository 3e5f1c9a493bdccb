"""What a transfer method is, as data and pure functions: strategy specs resolved into stages
of (group pattern, rule) lists (`strategies`), optax partitions and schedules (`optim`), the
loss penalties of regularised fine-tuning (`penalty`), and the converged linear probe"s
solver on cached features (`probe`). Nothing here runs a training loop.
"""

__all__ = ["optim", "penalty", "probe", "strategies"]
