"""The fleet's HTTP API: one router per resource, mounted under ``/api/v1``."""
