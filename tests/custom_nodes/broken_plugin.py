"""Test plugin that fails at import: the server must report it and keep going."""
raise RuntimeError("broken plugin: boom at import")
