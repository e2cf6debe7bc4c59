"""The built-in recipes, shipped as package data (``cxrlab list recipes``); found by ``cxrlab.config``."""
