"""Metrics of an evaluation (accuracy, 95% CIs over episodes or seeds, ECE/NLL, per-class
accuracy) and the transductive option (TransCLIP); the protocols that use them are
:mod:`fskd.protocols`."""
