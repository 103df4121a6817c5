"""comfyserve cluster_proxy."""
