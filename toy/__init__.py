"""The miniature replication (`make toy`): a world of coloured shapes, its from-scratch base model (toy/base, made
by toy_base.py) and the DPO-vs-SFT loop with its evaluation (toy_replication.py)."""
