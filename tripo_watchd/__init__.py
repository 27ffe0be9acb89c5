"""tripo-watchd: watch folders and upload every new file to Tripo 3D's storage."""

__version__ = "0.1.0"
