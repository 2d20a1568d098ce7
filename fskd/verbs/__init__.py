"""What each verb does between its config and its result; :mod:`fskd.api` is their facade (type checks, progress)."""
