"""The text corpus as every part of the project reads it: document splits and their token streams."""
