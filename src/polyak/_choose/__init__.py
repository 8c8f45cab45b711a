"""Evaluate and choose: sweeps over "average of the newest n" × scheme × alpha with running
sums, selection on validation data, greedy soups, diagnostics and reports.

Private: the public names are re-exported by :mod:`polyak`.
"""
