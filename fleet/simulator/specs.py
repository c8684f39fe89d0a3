"""What a simulated fleet is made of: each device's identity (:class:`SimulatedDeviceSpec`)
and what every device does, per bundle (:class:`Behaviour`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_LATENCY_MS", "Behaviour", "SimulatedDeviceSpec"]

DEFAULT_LATENCY_MS = 5.0
"""p95 latency reported for a bundle that ``Behaviour.latency_ms`` does not name."""


@dataclass(frozen=True)
class SimulatedDeviceSpec:
    """One device's identity, as enrolment hands it out, and the bundle it starts with."""

    device_id: str
    username: str | None
    password: str | None
    cert_file: Path | None = None
    key_file: Path | None = None
    bundle: str | None = None
    """``NAME-VERSION`` it serves at start, or ``None`` for a device never given one."""
    bundle_version_number: int | None = None


@dataclass
class Behaviour:
    """What every simulated device does, per bundle (``NAME-VERSION``)."""

    failing_bundles: set[str] = field(default_factory=set)
    """Installs of these end in ack ``failed`` (the health check fails); the device keeps
    serving what it served before."""
    error_rate: dict[str, float] = field(default_factory=dict)
    """Fraction of inferences reported as errors; 0 for bundles not named."""
    latency_ms: dict[str, float] = field(default_factory=dict)
    """p95 latency reported; :data:`DEFAULT_LATENCY_MS` for bundles not named."""
    inferences_per_report: int = 100
    telemetry_interval_s: float | None = None
    """Each device reports this often (phases spread by seed); ``None``: only on
    :meth:`FleetSimulator.publish_telemetry`."""
    install_delay_s: float = 0.0
    """From ack ``downloading`` to the final ack, spread evenly over the steps between."""
    shadow_agreement: dict[str, float] = field(default_factory=dict)
    """Fraction of a shadow bundle's predictions that agree with the serving one; 1 if not
    named."""
    compress_telemetry: bool = True
    receipt_timeout_s: float | None = 30.0
    """A record stays with the device until the fleet's storage receipt names it, as the
    agent keeps it (agent/telemetry.py); one PUBACKed and not receipted within this (doubling
    while none comes, up to ten minutes) is sent again. ``None``: the PUBACK delivers it (a
    broker with no fleet behind it)."""

    def __post_init__(self) -> None:
        for name, rates in (
            ("error_rate", self.error_rate),
            ("shadow_agreement", self.shadow_agreement),
        ):
            bad = {b: r for b, r in rates.items() if not 0.0 <= r <= 1.0}
            if bad:
                raise ValueError(f"{name} must be fractions in [0, 1], got {bad}")
        if self.inferences_per_report < 0:
            raise ValueError(
                f"inferences_per_report must be >= 0, got {self.inferences_per_report}"
            )
        if self.telemetry_interval_s is not None and self.telemetry_interval_s <= 0:
            raise ValueError(
                f"telemetry_interval_s must be > 0 or None, got {self.telemetry_interval_s}"
            )
        if self.receipt_timeout_s is not None and self.receipt_timeout_s <= 0:
            raise ValueError(f"receipt_timeout_s must be > 0 or None, got {self.receipt_timeout_s}")
        if self.install_delay_s < 0:
            raise ValueError(f"install_delay_s must be >= 0, got {self.install_delay_s}")
