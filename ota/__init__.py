"""Update bundles, TUF signing and verification, deltas and resumable downloads.

Lands with issue #4; only the command line exists so far.
"""
