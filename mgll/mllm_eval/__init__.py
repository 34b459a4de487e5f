"""Multiple-choice fundus QA benchmark harness for MLLMs (issue: MCQ benchmark).

The paper's Table 2: each MLLM, with its own vision encoder and with the MGLL one swapped in
(``mgll.adapters``), answers "which of these diseases is shown?" over the ten fundus diseases.

- :mod:`~mgll.data.question_bank` (in `mgll.data`: alignment builds its MCQ instructions from it too): seeded, versioned JSONL question banks from a records dataset.
- :mod:`~mgll.mllm_eval.scoring`: ``loglik`` (shared-prefix KV cache, batched options) and
  ``generate`` (greedy + :mod:`~mgll.mllm_eval.extract`) scoring, resumable per question.
- :mod:`~mgll.mllm_eval.report`: per-disease accuracy, unweighted average, + MGLL deltas, chart.
- :mod:`~mgll.mllm_eval.lmms_eval_export` / :mod:`~mgll.mllm_eval.vlmevalkit_export`: the bank as an lmms-eval
  task folder (hooks: :mod:`~mgll.mllm_eval.lmms_eval_task`) or a VLMEvalKit MCQ TSV, for models only those
  harnesses host; :mod:`~mgll.mllm_eval.import_predictions` reads their predictions back into run folders.
- :mod:`~mgll.mllm_eval.cli`: ``mgll mcq build|run|compare|export|import``.
"""
