"""Evaluation: validation log perplexity (`perplexity.py`); zero-shot tasks go in `tasks/`."""
