"""Evaluation: task registry and loaders (`tasks`), the paper's scorers (`scorers`), log-likelihood and
perplexity (`loglik`), and the typed `evaluate` of a base (+ adapter) on a task."""
