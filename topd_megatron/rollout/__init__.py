"""Stage 2: rollout engines. They turn token-id prompts into sampled continuations with per-token log-probs.

Two implementations plug into the same protocols (`engine.RolloutEngine`, `engine.TeacherScorer`):
- `embedded.EmbeddedEngine`: samples in-process from the Megatron student/teacher (any TP/PP; vocab-parallel
  sampling, no gather of the vocabulary). The laptop default.
- `sglang.engine.SGLangEngine`: SGLang servers (launched or attached), weight sync after every step: the at-scale
  path; it also scores sequences by teacher forcing for a teacher that is only served.

`factory.rollout_engine(kind, ...)` builds the one a run names. The trainer owns tokenisation: engines see token ids
only. Calls are collective over the model-parallel group (every rank passes the same prompts, every rank gets the
same result).
"""
