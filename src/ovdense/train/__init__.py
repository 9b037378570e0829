"""Training: DeCLIP and SCD distillation on unlabeled images."""
