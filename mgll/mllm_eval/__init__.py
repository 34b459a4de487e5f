"""Multiple-choice fundus QA benchmark harness for MLLMs (issue: MCQ benchmark).

The paper's Table 2: each MLLM, with its own vision encoder and with the MGLL one swapped in
(``mgll.adapters``), answers "which of these diseases is shown?" over the ten fundus diseases.

- :mod:`~mgll.mllm_eval.question_bank`: seeded, versioned JSONL question banks from a records dataset.
- :mod:`~mgll.mllm_eval.scoring`: ``loglik`` (shared-prefix KV cache, batched options) and
  ``generate`` (greedy + :mod:`~mgll.mllm_eval.extract`) scoring, resumable per question.
- :mod:`~mgll.mllm_eval.report`: per-disease accuracy, unweighted average, + MGLL deltas, chart.
- :mod:`~mgll.mllm_eval.cli`: ``mgll mcq build|run|compare``.
"""
