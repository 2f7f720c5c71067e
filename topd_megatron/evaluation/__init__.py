"""Evaluation: of a task's held-out problems during training, and of math benchmarks (`topd eval`).

task_eval.py    EvalConfig and `evaluate_task`: avg@k on a Task's held-out problems through the rollout engine
statistics.py   avg@k, unbiased pass@k, standard errors over problems
benchmarks.py   Benchmark: registered names (aime24, aime25, math500, gsm8k), your JSONL files, hub datasets
prompting.py    the user turn (problem + instruction) rendered with the model's own chat template
extract.py      the final-answer text of a completion under a benchmark's answer rule
grading.py      that answer against the reference with math-verify: `grade(completion, reference) -> bool` (the
                grading contract), `grade_detailed` -> Grade(correct, status, extracted)
runner.py       `topd eval` on ranks; cli.py its command line
"""
