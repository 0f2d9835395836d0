"""Evaluation: metrics, subgroup analysis, probes of frozen encoders, reports."""
