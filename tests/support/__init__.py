"""Helpers shared by the tests: synthetic datasets, tiny text models, CLI flags."""
