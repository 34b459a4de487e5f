"""Measuring a trained encoder: linear probe, zero-shot, fine-tune, their metrics, paired comparisons and reports.

Evaluation reads encoders that :mod:`mgll.encoder` trained and datasets :mod:`mgll.data` built; nothing in
training imports from here.
"""
