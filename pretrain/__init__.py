"""dinoforge self-supervised pretraining: ViT backbones, the DINOv2 objective, FSDP trainer, distillation, eval."""

__version__ = "0.1.0"
