"""Vision-tower adapters, projectors and MLLM hosts for swapping an MGLL encoder into multimodal LLMs (issue: adapters)."""
