"""A/B model slots: two directories, and one pointer file saying which of them serves.

::

    DATA_DIR/slots/a/, DATA_DIR/slots/b/   an unpacked bundle each (manifest.json + its files)
    DATA_DIR/slots/pointer.json            {"format": 1, "current": "a", "previous": "b"}

A new bundle is staged into the slot that is not serving, and ``switch()`` makes it the
serving one; ``revert()`` goes back to the slot that served before.

The pointer is a small JSON file replaced with tmp + fsync + ``os.replace`` + fsync of the
folder, not a ``current`` symlink: ``current`` and ``previous`` then change together in one
rename (two symlinks would take two renames, with a crash possible between them), it works
on every file system a data partition may use (FAT and exFAT have no symlinks), and it is
read with one ``read()``.

A slot directory exists only whole: ``stage()`` unpacks into a hidden staging folder,
fsyncs every file and folder in it, and renames it into place; a slot being replaced is
first renamed to a hidden name and then deleted. Hidden leftovers of a crash are removed
when the slots are opened.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from contracts.durable import fsync_directory, fsync_tree, write_atomic
from ota.errors import BundleError
from ota.manifest import MANIFEST_NAME, Manifest, parse_manifest

from .errors import UpdateError
from .model import unpack_bundle

__all__ = ["SLOT_NAMES", "Slot", "SlotName", "Slots"]

SlotName = Literal["a", "b"]
SLOT_NAMES: tuple[SlotName, SlotName] = ("a", "b")
_POINTER = "pointer.json"
_FORMAT = 1


@dataclass(frozen=True)
class Slot:
    name: SlotName
    path: Path

    @property
    def installed(self) -> bool:
        """Whether the slot holds a bundle (a staged slot always holds a whole one)."""
        return (self.path / MANIFEST_NAME).is_file()

    def manifest(self) -> Manifest:
        """The manifest of the bundle in this slot; :class:`UpdateError` if it holds none."""
        try:
            return parse_manifest((self.path / MANIFEST_NAME).read_bytes())
        except (OSError, BundleError) as e:
            raise UpdateError(
                f"slot {self.name} ({self.path}) holds no readable bundle: {e}"
            ) from e


class Slots:
    """The two slots under ``data_dir/slots`` and the pointer between them."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "slots"
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".*"):  # staging, trash and tmp files of a crash
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()

    def slot(self, name: SlotName) -> Slot:
        return Slot(name, self.root / name)

    def active(self) -> Slot | None:
        """The serving slot, or ``None`` before the first switch."""
        current, _ = self._read_pointer()
        return self.slot(current) if current else None

    def previous(self) -> Slot | None:
        """The slot that served before the last switch, while it still holds that bundle."""
        _, previous = self._read_pointer()
        return self.slot(previous) if previous else None

    def inactive(self) -> Slot:
        """The slot the next bundle is staged into: the one that is not serving."""
        current, _ = self._read_pointer()
        return self.slot("b" if current == "a" else "a")

    def stage(self, bundle: Path) -> Manifest:
        """Replace the inactive slot's contents with ``bundle``, unpacked and hash-checked.

        Raises ``ota.errors.BundleError`` when the bundle is not what its manifest says; the
        slot is then empty. The serving slot is never touched.
        """
        current, previous = self._read_pointer()
        target = self.inactive()
        if previous == target.name:  # its bundle is about to go: nothing to revert to
            self._write_pointer(current, None)
        self._remove(target.path)
        staging = self.root / f".staging-{target.name}"
        self._remove(staging)
        manifest = unpack_bundle(bundle, staging)
        fsync_tree(staging)
        staging.rename(target.path)
        fsync_directory(self.root)
        return manifest

    def switch(self) -> Slot:
        """Serve the inactive slot; the slot serving until now becomes ``previous``."""
        current, _ = self._read_pointer()
        target = self.inactive()
        if not target.installed:
            raise RuntimeError(f"slot {target.name} holds no bundle: stage() one before switch()")
        self._write_pointer(target.name, current)
        return target

    def revert(self) -> Slot | None:
        """Serve ``previous`` again and forget it as a way back; returns the serving slot.

        With no previous slot (a first install being undone) nothing serves afterwards.
        """
        current, previous = self._read_pointer()
        if current is None:
            raise RuntimeError("no slot is serving: there is nothing to revert")
        self._write_pointer(previous, None)
        return self.slot(previous) if previous else None

    def _read_pointer(self) -> tuple[SlotName | None, SlotName | None]:
        path = self.root / _POINTER
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as e:
            raise UpdateError(
                f"{path} is unreadable ({e}): the data partition is damaged; remove the file "
                "to start with no model, then deploy one"
            ) from e
        valid = (
            isinstance(data, dict)
            and data.get("format") == _FORMAT
            and data.get("current") in (*SLOT_NAMES, None)
            and data.get("previous") in (*SLOT_NAMES, None)
            and (data.get("current") is None or data["current"] != data.get("previous"))
        )
        if not valid:
            raise UpdateError(
                f"{path} is not a format {_FORMAT} slot pointer: {data!r}; remove it to start "
                "with no model, then deploy one"
            )
        return cast(SlotName | None, data.get("current")), cast(
            SlotName | None, data.get("previous")
        )

    def _write_pointer(self, current: SlotName | None, previous: SlotName | None) -> None:
        data = {"format": _FORMAT, "current": current, "previous": previous}
        write_atomic(self.root / _POINTER, (json.dumps(data) + "\n").encode())

    def _remove(self, directory: Path) -> None:
        """Delete ``directory`` so that a crash midway never leaves a partial slot behind."""
        if not directory.exists():
            return
        trash = self.root / f".trash-{directory.name.lstrip('.')}"
        shutil.rmtree(trash, ignore_errors=True)
        directory.rename(trash)
        fsync_directory(self.root)
        shutil.rmtree(trash)
