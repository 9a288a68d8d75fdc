"""renderfarm: a render farm for diffusion image models."""

__version__ = "0.1.0"
