"""Optuna studies over the PnP-OVSS segmenter, maximising annotation-free objectives."""
