"""The miniature replication (`make toy`): a world of coloured shapes, its from-scratch base models (toy/base, an SD
pipeline, and toy/base_sd3, an SD3 pipeline, both made by toy_base.py) and the DPO-vs-SFT loop with its evaluation
(toy_replication.py), run through train_diffusion_dpo.py or, with --family sd3, train_diffusion_dpo_sd3.py."""
