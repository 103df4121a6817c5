"""comfyserve queue_service."""
