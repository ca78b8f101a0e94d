"""Evaluation of trained runs: frozen features, linear probes, decoders, plots and an HTML report."""
