"""Names the command line offers before anything heavy is imported: probe tasks and decoder losses."""

from typing import Literal

Task = Literal["syllables", "vowels", "speakers", "phones"]
TASKS: tuple[Task, ...] = ("syllables", "vowels", "speakers", "phones")
LOSSES = ("mse", "spectral", "mel", "mse+spectral", "mse+mel")
