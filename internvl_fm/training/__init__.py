"""Contrastive training of InternVL-C, the synthetic multilingual shapes dataset and its tokenizer.

Modules: `data` (dataset generator), `tokenizer` (sentencepiece trainer), `loss` (symmetric InfoNCE), `trainer`
(training loop, checkpoints), `evaluate` (recall, zero-shot accuracy), `cli` (`internvl-fm train-clip`).
"""
