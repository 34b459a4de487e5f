"""Tiny random-init models built from transformers' (and OpenFlamingo's) own classes, for tests and the quickstart.

They are not production adapters: they exist so that every host can be swapped, aligned and scored on a CPU
in seconds. The quickstart's MCQ stage uses the LLaVA one; tests/helpers/stock_models.py builds the stock
models the interop tests check against (independent of these builders, on purpose).
"""
