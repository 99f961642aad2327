"""pie-trio: a programmable LLM serving system on trio."""

__version__ = "0.1.0"
