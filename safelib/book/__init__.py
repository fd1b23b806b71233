"""What the chapters show: seaborn figures, ipywidgets explorers, and the short tour (``python -m safelib.book.demo``).

Top wing: it may import any other; nothing in the library imports it.
"""
from . import ablations, plots, realcheck, widgets

__all__ = ["ablations", "plots", "realcheck", "widgets"]
