"""imgsearch: detect products in a photo, embed them, and find them in a billion-image catalog."""

__version__ = "0.1.0"
