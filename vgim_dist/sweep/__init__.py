"""Sweeps: many vgim runs at once on Ray Tune, from one sweep file (docs/sweeps.md)."""
