"""Limits' repositories: monthly request counts and aggregated rate-limit refusals."""
