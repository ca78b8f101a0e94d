"""The pipeline runner: one Ray Train worker per stage, activations streamed forward point-to-point."""
