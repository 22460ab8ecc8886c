"""Training pipeline: task data, metrics, fine-tuning, importance, distillation, evaluation."""
