"""The on-device agent: inference runtimes, cloud fallback, telemetry queue, A/B updater.

Lands with issue #6; only the command line exists so far.
"""
