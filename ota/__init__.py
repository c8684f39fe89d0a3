"""Update bundles, TUF signing and verification, deltas and resumable downloads.

Map: ``manifest`` (what a bundle holds) → ``archive`` (the .efb file) → ``bundle`` (from a
compile output) → ``keys`` and ``repository`` (signing, TUF) → ``client`` and ``download``
(the device: verify, resume) → ``verify`` (side-loaded, offline) and ``delta``.
``errors`` holds the one exception hierarchy. docs/ota.md has the whole story.
"""
