"""The method: models and their specs, learngene extraction, descendants, training, fine-tuning, evaluation."""
