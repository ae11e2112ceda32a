"""Remove decoder layers from causal LMs and repair the gap with closed-form ghost operators."""

__version__ = "0.1.0"
