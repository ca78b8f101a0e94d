"""The data section of the experiment config (``data.*`` keys): defined with every other section in
`vgim_dist.config`, and importable from here as well."""

from vgim_dist.config import DataConfig

__all__ = ["DataConfig"]
