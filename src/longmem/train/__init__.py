"""Memory-augmented adaptation: the typed run config, the trainer (single process and torchrun), checkpoints,
LoRA, the document stream and the synthetic recall spans and facts written into it."""
