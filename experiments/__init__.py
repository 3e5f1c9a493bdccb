"""The experiments, one module each (`get_config()`), found by name by `tlresearch.run`.

`ALL`: what `--experiment=all` runs, in this order on one cell store: the main table and the
paper reproductions (the ones that need ImageNet weights or a downloaded folder are left out:
they cannot run offline by default).
"""

ALL = ("finetune_sweep", "layer_transfer", "surgical", "lp_ft", "data_efficiency",
       "dropout_ablation", "early_stopping_ablation", "regularized_ft", "transferability")
