"""The training runtime shared by every trainer, contrastive training of InternVL-C, and its synthetic data.

Modules: `runtime` (distributed init / teardown, resumable sampler, transformers LR schedules, atomic checkpoints,
JSONL log: used by contrastive training, segmentation training and linear probes), `data` (dataset generator),
`tokenizer` (sentencepiece trainer), `loss` (symmetric InfoNCE), `trainer` (the contrastive training loop),
`evaluate` (recall, zero-shot accuracy), `cli` (`internvl-fm train-clip`).
"""
