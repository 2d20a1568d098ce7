"""Evaluation protocols: batched episodes and the all-way protocol, with 95% CIs."""
