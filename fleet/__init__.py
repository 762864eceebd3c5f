"""The Iwaki fleet manager: registry, relay, health and the demo."""
__version__ = "0.1.0"
