"""The Flask side: the extension, the HTTP API, health and metrics endpoints, admin commands.

Flask is imported here and nowhere else in the package.
"""
