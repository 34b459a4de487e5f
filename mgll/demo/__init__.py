"""Gradio demo comparing a base MLLM with its MGLL-swapped twin (issue: demo)."""
