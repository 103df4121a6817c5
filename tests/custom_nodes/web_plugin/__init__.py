"""Test plugin package: a relative import and a WEB_DIRECTORY with a frontend extension."""
from .node import TestEcho

NODE_CLASS_MAPPINGS = {"TestEcho": TestEcho}
WEB_DIRECTORY = "./js"
