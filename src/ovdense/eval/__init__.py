"""Benchmark evaluation: dataset readers, class-name files, label converters, metrics and the runner."""
