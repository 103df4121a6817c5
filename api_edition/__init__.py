"""comfyserve api_edition."""
