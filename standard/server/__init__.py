"""The ComfyUI-protocol HTTP/WS server of one instance (embedded engine mode)."""
