"""The paper's CLIP evaluation: `clip_io` (CLIP loading and embedding), `clip_scores`
(the similarity scores), `prompt_lists` (editability prompts), `plot` (the scatter plot)
and `evaluator` (the protocol).
"""
