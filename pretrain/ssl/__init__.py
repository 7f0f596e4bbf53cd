"""Self-supervised meta-architectures (student / EMA teacher, distillation) and collapse monitors."""
