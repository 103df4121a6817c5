"""comfyserve standard edition: one ComfyUI-protocol instance on one data dir.

The other editions build on what lives here: auth, data-dir paths, the
instance client.
"""

__version__ = "0.1.0"
