"""Reference models trained by mmskip's own recipes."""
