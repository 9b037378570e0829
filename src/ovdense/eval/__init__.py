"""Benchmark evaluation: benchmark specs, dataset and label readers, class-name files, label converters, metrics and
the runner."""
