"""The fleet server: model registry, devices, MQTT bridge, staged rollouts, dashboard.

Lands with issue #5; only the command line exists so far.
"""
