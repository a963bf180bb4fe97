"""Evaluation: the threat models and the per-sample worst case (`threats`, making the typed results of
`reports.results`), one evaluation run for `hardener.evaluate` and `harden eval` alike (`run`), and inference-time
post-training (`adaptive`)."""
