"""Experiments that make the shipped assets: the mini-CLIP's pretraining and its acceptance evaluation.

Top wing: they call the library (the evaluation goes through ``safelib.runs``); the library never imports them.
"""
