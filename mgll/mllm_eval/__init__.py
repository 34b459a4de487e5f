"""Multiple-choice fundus QA benchmark harness for MLLMs (issue: MCQ benchmark)."""
