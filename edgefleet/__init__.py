"""The roof: the ``edgefleet`` command and the end-to-end demo, built from every package."""
