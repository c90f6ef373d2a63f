"""codir-ds's benchmark and study scripts (``python bench/<script>.py``); ``bench.cli`` holds what their command
lines share. See bench/README.md."""
