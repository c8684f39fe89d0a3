"""The A/B updater: one persisted state machine from a fleet command to a serving model.

::

    IDLE --deploy--> DOWNLOADING --downloaded--> VERIFYING --verified--> STAGED --ready-->
         SWITCHING --switched--> HEALTH_CHECK --healthy--> COMMITTED --done--> IDLE
    DOWNLOADING, VERIFYING, STAGED --fail--> FAILED --done--> IDLE   (the old model never stopped)
    SWITCHING, HEALTH_CHECK --fail--> ROLLING_BACK --rolled_back--> ROLLED_BACK --done--> IDLE
    HEALTH_CHECK --rollback command--> ROLLING_BACK;  IDLE --rollback command--> ROLLING_BACK
    ROLLING_BACK --fail--> FAILED

Every transition is in :data:`TRANSITIONS`; every state change goes through
``Updater._enter``, which saves the state and its data (command, signed target, slots,
save count, latest ack per command) to ``DATA_DIR/updater.json`` with tmp + fsync +
``os.replace`` *before* the state acts, then sends the state's ack (:data:`ACKS`), then
runs the state's step, which returns the next event (``None``: the health check waits for
inferences). After a crash, :meth:`Updater.recover` restarts the saved state as
:data:`RESUME` says. A deployment that saves more than ``max_state_saves`` states (a crash
loop) takes its state's failure edge instead of entering it, as Mender's
``kMaxStateDataStoreCount`` does. ``EDGEFLEET_AGENT_CRASH_AT`` kills the process at a
chosen point, for crash tests (``agent._crashpoints``).

A command whose ``metadata_url`` or ``targets_url`` names another origin than the fleet's
(``agent.origin``) is refused before anything is fetched. Bundles come through TUF
(``ota.client.OtaClient``): the metadata must be current, the command must name the bytes
the signed targets list, the bundle must not be older than the installed one, and the
download resumes with HTTP Range. The health check loads the new
slot, runs the bundle's golden vectors, serves the model and watches the error rate of its
first ``HealthConfig.watch_inferences`` inferences (reported through :meth:`Updater.observe`).
"""

from __future__ import annotations

import copy
import enum
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile

from contracts.durable import write_atomic
from contracts.mqtt import Ack, AckState, BundleRef, Command, CommandKind
from ota.archive import read_manifest
from ota.client import OtaClient, TrustStatus, bundle_fields, check_not_older
from ota.errors import OtaError, TrustError
from ota.manifest import Manifest

from ._crashpoints import CRASH_AT_ENV, CrashPoints
from .config import HealthConfig, OtaConfig
from .errors import AgentError, UpdateError
from .model import LoadedModel, load_installed
from .origin import Origin, foreign_urls
from .slots import SlotName, Slots

__all__ = [
    "ACKS",
    "CRASH_AT_ENV",
    "MAX_STATE_SAVES",
    "RESUME",
    "RESUME_AFTER_SWITCH",
    "STATE_FILE",
    "TRANSITIONS",
    "Event",
    "State",
    "Updater",
]

log = logging.getLogger(__name__)

STATE_FILE = "updater.json"
MAX_STATE_SAVES = 20
"""State saves one deployment may make (a clean one makes 5) before it is failed."""
_KEPT_ACKS = 64


class State(enum.StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    SWITCHING = "switching"
    HEALTH_CHECK = "health_check"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"

    @property
    def outcome(self) -> bool:
        """A command's end: the state acks it, forgets the deployment and returns to IDLE."""
        return self in (State.COMMITTED, State.ROLLED_BACK, State.FAILED)


class Event(enum.StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    READY = "ready"
    SWITCHED = "switched"
    HEALTHY = "healthy"
    ROLLED_BACK = "rolled_back"
    FAIL = "fail"
    DONE = "done"


_S, _E = State, Event
TRANSITIONS: Final[Mapping[tuple[State, Event], State]] = {
    (_S.IDLE, _E.DEPLOY): _S.DOWNLOADING,
    (_S.IDLE, _E.ROLLBACK): _S.ROLLING_BACK,
    (_S.DOWNLOADING, _E.DOWNLOADED): _S.VERIFYING,
    (_S.DOWNLOADING, _E.FAIL): _S.FAILED,
    (_S.VERIFYING, _E.VERIFIED): _S.STAGED,
    (_S.VERIFYING, _E.FAIL): _S.FAILED,
    (_S.STAGED, _E.READY): _S.SWITCHING,
    (_S.STAGED, _E.FAIL): _S.FAILED,
    (_S.SWITCHING, _E.SWITCHED): _S.HEALTH_CHECK,
    (_S.SWITCHING, _E.FAIL): _S.ROLLING_BACK,
    (_S.HEALTH_CHECK, _E.HEALTHY): _S.COMMITTED,
    (_S.HEALTH_CHECK, _E.FAIL): _S.ROLLING_BACK,
    (_S.HEALTH_CHECK, _E.ROLLBACK): _S.ROLLING_BACK,
    (_S.ROLLING_BACK, _E.ROLLED_BACK): _S.ROLLED_BACK,
    (_S.ROLLING_BACK, _E.FAIL): _S.FAILED,
    # Outcomes only ack and clean up (errors there are ignored), so they cannot fail.
    (_S.COMMITTED, _E.DONE): _S.IDLE,
    (_S.ROLLED_BACK, _E.DONE): _S.IDLE,
    (_S.FAILED, _E.DONE): _S.IDLE,
}
"""The whole lifecycle: ``(state, event) -> next state``. IDLE waits for a command."""

RESUME: Final[Mapping[State, State]] = {
    _S.IDLE: _S.IDLE,
    _S.DOWNLOADING: _S.DOWNLOADING,  # the partial download resumes with HTTP Range
    _S.VERIFYING: _S.VERIFYING,  # verify the downloaded file again
    _S.STAGED: _S.STAGED,  # check the staged slot, then switch
    _S.SWITCHING: _S.ROLLING_BACK,  # the pointer had not moved: undo (else RESUME_AFTER_SWITCH)
    _S.HEALTH_CHECK: _S.ROLLING_BACK,  # a crash during the check is a failed check (Mender)
    _S.COMMITTED: _S.COMMITTED,
    _S.ROLLING_BACK: _S.ROLLING_BACK,  # idempotent: point back, load, serve
    _S.ROLLED_BACK: _S.ROLLED_BACK,
    _S.FAILED: _S.FAILED,
}
"""Where a state saved before a crash restarts."""
RESUME_AFTER_SWITCH: Final = State.HEALTH_CHECK
"""Where SWITCHING restarts when the slot pointer already names the new slot."""

ACKS: Final[Mapping[State, AckState]] = {
    _S.DOWNLOADING: AckState.DOWNLOADING,
    _S.STAGED: AckState.VERIFIED,
    _S.HEALTH_CHECK: AckState.INSTALLED,
    _S.COMMITTED: AckState.HEALTHY,
    _S.ROLLING_BACK: AckState.FAILED,  # for a deploy; a rollback command acks its outcome only
    _S.ROLLED_BACK: AckState.ROLLED_BACK,
    _S.FAILED: AckState.FAILED,
}
"""The ack each state sends to the fleet when it is entered."""

# Saving these counts toward max_state_saves; IDLE and the outcomes are not retried work.
# ROLLING_BACK is never refused for the cap: it is the way out, and it is idempotent.
_COUNTED = frozenset(
    {_S.DOWNLOADING, _S.VERIFYING, _S.STAGED, _S.SWITCHING, _S.HEALTH_CHECK, _S.ROLLING_BACK}
)
# States after which recover() serves the slot the pointer names before going on.
_SERVING_ACTIVE = frozenset(RESUME) - {_S.SWITCHING, _S.HEALTH_CHECK, _S.ROLLING_BACK}
# What a step may raise for its failure edge; anything else is a bug and propagates.
_STEP_ERRORS = (OtaError, AgentError, OSError)


class _Record(BaseModel):
    """What ``updater.json`` holds: the state, the command in progress and its data."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    state: State = State.IDLE
    command: Command | None = None
    target: dict[str, Any] | None = None
    """The signed TUF target of the bundle (``TargetFile.to_dict()``), once downloaded."""
    slot: SlotName | None = None
    """The slot a deploy stages into and switches to."""
    fallback: SlotName | None = None
    """The slot to serve when this command fails (a rollback command: the one it goes to)."""
    saves: int = 0
    detail: str = ""
    """Why the command is failing, or how its health check went."""
    acks: dict[str, Ack] = {}
    """The latest ack of the last commands, oldest first: a resent command is re-acked."""


def _label(thing: Manifest | BundleRef) -> str:
    return f"{thing.name}-{thing.version}"


@dataclass
class _Watch:
    """The error rate of the first ``needed`` inferences on a new model."""

    needed: int
    max_error_rate: float
    deadline: float
    seen: int = 0
    errors: int = 0

    def observe(self, error: bool) -> tuple[Event, str] | None:
        self.seen += 1
        self.errors += error
        if self.errors > self.max_error_rate * self.needed:  # the rate can only end above
            return Event.FAIL, (
                f"{self.errors} of the first {self.seen} inferences failed: the error rate over "
                f"{self.needed} is above the {self.max_error_rate:.0%} allowed"
            )
        if self.seen >= self.needed:
            return Event.HEALTHY, (
                f"{self.errors} of the first {self.seen} inferences failed "
                f"(at most {self.max_error_rate:.0%} allowed)"
            )
        return None

    def expired(self, now: float, timeout_s: float) -> tuple[Event, str] | None:
        if now < self.deadline:
            return None
        return Event.HEALTHY, (
            f"only {self.seen} of {self.needed} inferences ({self.errors} failed) in "
            f"{timeout_s:g} s: committed on the golden vectors"
        )


class Updater:
    """Installs bundles the fleet commands into A/B slots under ``data_dir``, crash-safely.

    ``ack`` receives each :class:`~contracts.mqtt.Ack` to publish; ``activate`` receives
    the model to serve from now on (``None``: no model), and closes the one it replaces.
    Both are called with the updater's lock held, so they must not call back into it.
    ``http`` carries the device's token and TLS settings to the fleet (metadata and
    bundles); a command whose URLs name another origin than ``origin`` is refused (``None``:
    any origin, and ``http`` decides what it sends where); ``clock`` times the health
    check's watch. Call :meth:`recover` once at start, then :meth:`handle` for commands,
    :meth:`observe` for each inference on the serving model and :meth:`poll` now and then
    (it ends a watch that saw too little traffic). Thread-safe.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        ack: Callable[[Ack], None],
        activate: Callable[[LoadedModel | None], None],
        ota: OtaConfig | None = None,
        health: HealthConfig | None = None,
        http: httpx.Client | None = None,
        origin: Origin | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_state_saves: int = MAX_STATE_SAVES,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._path = data_dir / STATE_FILE
        self._metadata_dir = data_dir / "ota" / "metadata"
        self._downloads = data_dir / "ota" / "downloads"
        self._slots = Slots(data_dir)
        self._ack = ack
        self._activate = activate
        self._ota = ota or OtaConfig()
        self._health = health or HealthConfig()
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=30.0, follow_redirects=True)
        self._origin = origin
        self._clock = clock
        self._max_saves = max_state_saves
        self._crash = CrashPoints(os.environ.get(CRASH_AT_ENV, ""), list(State))
        self._crash.install(self._http)
        self._lock = threading.RLock()
        self._record = _Record()
        self._recovered = False
        self._watch: _Watch | None = None
        self._serving: Manifest | None = None
        self._trust: TrustStatus | None = None
        self._steps: dict[State, Callable[[], Event | None]] = {
            State.IDLE: lambda: None,
            State.DOWNLOADING: self._download,
            State.VERIFYING: self._verify,
            State.STAGED: self._check_staged,
            State.SWITCHING: self._switch,
            State.HEALTH_CHECK: self._health_check,
            State.ROLLING_BACK: self._roll_back,
            State.COMMITTED: self._finish,
            State.ROLLED_BACK: self._finish,
            State.FAILED: self._finish,
        }

    # --- what the agent sees ---------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._record.state

    @property
    def serving(self) -> Manifest | None:
        """The manifest of the model last handed to ``activate``."""
        return self._serving

    @property
    def last_outcome(self) -> Ack | None:
        """The final ack of the command finished last, for the device's status (the fleet
        reconciles a lost ack from it)."""
        acks = list(self._record.acks.values())  # one C call: no lock, no torn read
        return next((ack for ack in reversed(acks) if ack.state.final), None)

    def acked(self, command_id: str) -> Ack | None:
        """The latest ack of ``command_id`` if this device has seen it."""
        return self._record.acks.get(command_id)

    def record(self, ack: Ack) -> None:
        """Keep the ack of a command the agent handled itself (shadow), persisted, so that a
        resend of it is re-acked rather than acted on."""
        with self._lock:
            self._remember(ack)
            self._save()

    @property
    def trust(self) -> TrustStatus | None:
        """What the last TUF refresh said (``None`` before the first deploy), for status."""
        return self._trust

    def recover(self) -> None:
        """Serve what is installed and finish what a crash interrupted; call once at start.

        It ends with a model activated (the old or the new one) whenever one was ever
        installed, or with the health check of a new one waiting for inferences.
        """
        with self._lock:
            self._record = self._load()
            self._recovered = True
            saved = self._record.state
            resume = RESUME[saved]
            if saved is State.SWITCHING and self._pointer_moved():
                resume = RESUME_AFTER_SWITCH
            elif saved in (State.SWITCHING, State.HEALTH_CHECK):
                self._record.detail = (
                    f"the agent stopped during {saved} of {self._bundle()} (a crash, a kill or a "
                    "power cut): counted as a failure, so the update was undone"
                )
            if resume in _SERVING_ACTIVE:
                self._serve_active()
            if resume is not State.IDLE:
                self._continue(self._enter(resume))

    def handle(self, command: Command) -> None:
        """Act on a deploy or rollback command; a command seen before is only re-acked, and
        one whose URLs name another origin than the fleet's is refused.

        Returns when the command has an outcome, or when a new model is in its health
        check (then :meth:`observe` and :meth:`poll` finish it).
        """
        if command.kind not in (CommandKind.DEPLOY, CommandKind.ROLLBACK):
            raise ValueError(f"the updater takes deploy and rollback commands, not {command.kind}")
        with self._lock:
            if not self._recovered:
                raise RuntimeError("call Updater.recover() once before handle()")
            seen = self._record.acks.get(command.id)
            refusal = foreign_urls(command, self._origin) if self._origin else None
            if seen is not None:
                self._ack(seen.model_copy(update={"ts": time.time()}))
            elif refusal:
                self._reply(command, AckState.FAILED, refusal)
            elif command.kind is CommandKind.ROLLBACK:
                self._rollback_command(command)
            else:
                self._deploy_command(command)

    def observe(self, local_error: bool) -> None:
        """One inference on the serving model: whether the local runtime failed on it."""
        with self._lock:
            if self._watch is None or self._record.state is not State.HEALTH_CHECK:
                return
            self._conclude(self._watch.observe(local_error))

    def poll(self) -> None:
        """Commit a health check that saw too few inferences in ``watch_timeout_s``."""
        with self._lock:
            if self._watch is None or self._record.state is not State.HEALTH_CHECK:
                return
            self._conclude(self._watch.expired(self._clock(), self._health.watch_timeout_s))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    # --- commands --------------------------------------------------------------------------

    def _deploy_command(self, command: Command) -> None:
        ref = command.bundle
        if ref is None:
            self._reply(command, AckState.FAILED, "a deploy command needs a bundle; none was sent")
            return
        if self._record.state is not State.IDLE:
            self._reply_busy(command)
            return
        active = self._slots.active()
        if active is not None and active.installed and _label(active.manifest()) == _label(ref):
            self._reply(command, AckState.HEALTHY, f"{_label(ref)} is already serving")
            return
        fallback = active.name if active else None
        self._start(command, slot=self._slots.inactive().name, fallback=fallback)
        self._continue(Event.DEPLOY)

    def _rollback_command(self, command: Command) -> None:
        ref = command.bundle
        if self._record.state is State.HEALTH_CHECK:  # undo the deployment being checked
            deploy = self._record.command
            assert deploy is not None
            self._record.detail = f"rollback command {command.id} arrived during the health check"
            self._continue(Event.ROLLBACK)
            outcome = self._record.acks[deploy.id]
            self._reply(command, outcome.state, outcome.detail)
            return
        if self._record.state is not State.IDLE:
            self._reply_busy(command)
            return
        active, previous = self._slots.active(), self._slots.previous()
        serving = active.manifest() if active is not None and active.installed else None
        if ref is not None and serving is not None and _label(serving) == _label(ref):
            self._reply(command, AckState.ROLLED_BACK, f"{_label(ref)} is already serving")
            return
        if active is None or previous is None or not previous.installed:
            self._reply(command, AckState.FAILED, "no earlier bundle on this device to go back to")
            return
        if ref is not None and _label(previous.manifest()) != _label(ref):
            self._reply(
                command,
                AckState.FAILED,
                f"the bundle before this one was {_label(previous.manifest())}, not "
                f"{_label(ref)}: nothing changed",
            )
            return
        self._start(command, slot=active.name, fallback=previous.name)
        self._continue(Event.ROLLBACK)

    def _start(self, command: Command, *, slot: SlotName, fallback: SlotName | None) -> None:
        self._record = _Record(
            command=command, slot=slot, fallback=fallback, acks=self._record.acks
        )

    def _reply_busy(self, command: Command) -> None:
        current = self._record.command
        assert current is not None
        self._reply(
            command,
            AckState.FAILED,
            f"busy: command {current.id} is in {self._record.state}; resend this one when it "
            "has finished",
        )

    # --- the machine -----------------------------------------------------------------------

    def _continue(self, event: Event | None) -> None:
        while event is not None:
            event = self._enter(TRANSITIONS[(self._record.state, event)])

    def _enter(self, state: State) -> Event | None:
        """Save ``state`` with its data, send its ack, run its step: the one way in."""
        record = self._record
        if state in _COUNTED:
            record.saves += 1
            if record.saves > self._max_saves and state is not State.ROLLING_BACK:
                record.detail = (
                    f"gave up on {self._bundle()} after {self._max_saves} state saves (the "
                    f"agent keeps restarting during the update?), instead of entering {state}"
                )
                state = TRANSITIONS[(state, Event.FAIL)]
        record.state = state
        ack = self._entry_ack(state)
        if ack is not None:
            self._remember(ack)
        self._save()
        self._crash.saved(state)
        if ack is not None:
            self._ack(ack)
        try:
            return self._steps[state]()
        except _STEP_ERRORS as e:
            log.warning("%s of %s failed: %s", state, self._bundle(), e)
            record.detail = str(e)
            return Event.FAIL

    def _entry_ack(self, state: State) -> Ack | None:
        command = self._record.command
        ack_state = ACKS.get(state)
        if command is None or ack_state is None:
            return None
        if state is State.ROLLING_BACK and command.kind is CommandKind.ROLLBACK:
            return None
        detail = self._health_plan() if state is State.HEALTH_CHECK else self._record.detail
        return self._make_ack(command, ack_state, detail)

    def _health_plan(self) -> str:
        """What the health check waits for, so the fleet can say why a device is installed
        but not yet healthy."""
        health = self._health
        if health.watch_inferences == 0:
            return "health check: golden vectors"
        return (
            f"health check: golden vectors, then the first {health.watch_inferences} "
            f"inferences (at most {health.max_error_rate:.0%} failing) or "
            f"{health.watch_timeout_s:g} s, whichever comes first"
        )

    def _conclude(self, verdict: tuple[Event, str] | None) -> None:
        if verdict is not None:
            event, self._record.detail = verdict
            self._continue(event)

    # --- the steps -------------------------------------------------------------------------

    def _download(self) -> Event:
        ref = self._ref()
        client = self._client()
        self._trust = client.check()
        if not self._trust.can_install:
            raise UpdateError(
                f"installs are blocked, the TUF metadata is {self._trust.state}: "
                f"{self._trust.detail}. The running model keeps serving; resend the deploy "
                "once the device can fetch current metadata"
            )
        target = client.target(ref.target_path)
        signed = target.hashes.get("sha256")
        if (signed, target.length) != (ref.sha256, ref.length):
            raise TrustError(
                f"{ref.target_path}: refused, the command names sha256 {ref.sha256} of "
                f"{ref.length} bytes but the signed targets list {signed} of {target.length}: "
                "the fleet's bundle record and its TUF repository disagree"
            )
        check_not_older(target, self._installed_version_number())
        with self._crash.downloading(target.length):
            client.download(target)
        self._record.target = target.to_dict()
        return Event.DOWNLOADED

    def _verify(self) -> Event:
        target = self._target()
        path = self._client().local_path(target)
        try:
            with path.open("rb") as f:
                target.verify_length_and_hashes(f)
        except FileNotFoundError:
            raise UpdateError(
                f"the downloaded bundle {path} is gone (removed, or lost in a power cut before "
                "it reached the disk): resend the deploy"
            ) from None
        except tuf_errors.LengthOrHashMismatchError as e:
            raise TrustError(
                f"{path} no longer has the signed length and hash ({e}): the storage changed "
                "it after the download; resend the deploy"
            ) from None
        self._check_manifest(read_manifest(path), target, f"the bundle {target.path}")
        self._slots.stage(path)
        return Event.VERIFIED

    def _check_staged(self) -> Event:
        target = self._target()
        slot = self._slots.slot(self._deploy_slot())
        self._check_manifest(slot.manifest(), target, f"slot {slot.name}")
        return Event.READY

    def _switch(self) -> Event:
        slot = self._deploy_slot()
        active = self._slots.active()
        if active is None or active.name != slot:
            if self._slots.inactive().name != slot:
                raise UpdateError(f"slot {slot} was to be switched to but is not the inactive one")
            self._slots.switch()
            self._crash.switched()
        return Event.SWITCHED

    def _health_check(self) -> Event | None:
        model = load_installed(self._slots.slot(self._deploy_slot()).path)
        golden = model.check_golden_vectors()
        if not golden.passed:
            model.close()
            raise UpdateError(
                f"health check of {model.bundle} failed: golden vectors: {golden.detail}"
            )
        self._serve(model)
        self._record.detail = golden.detail
        health = self._health
        if health.watch_inferences == 0:
            return Event.HEALTHY
        self._watch = _Watch(
            health.watch_inferences, health.max_error_rate, self._clock() + health.watch_timeout_s
        )
        return None

    def _roll_back(self) -> Event:
        """Serve ``fallback`` again; idempotent, so a crash here just runs it again."""
        self._watch = None
        fallback = self._record.fallback
        active, previous = self._slots.active(), self._slots.previous()
        serving = active.name if active else None
        if serving != fallback:
            before = previous.name if previous else None
            if before != fallback:
                raise UpdateError(
                    f"cannot roll back to slot {fallback}: the pointer names slot {serving} "
                    f"and before it {before}"
                )
            self._slots.revert()
        if fallback is None:
            self._serve(None)
            served = "no model is serving (this was the first install)"
        else:
            slot = self._slots.slot(fallback)
            try:
                model = load_installed(slot.path)
            except AgentError as e:
                raise UpdateError(
                    f"rolled back to slot {fallback}, but it does not load: {e}"
                ) from e
            self._serve(model)
            served = f"{model.bundle} is serving again"
        command = self._record.command
        is_deploy = command is not None and command.kind is CommandKind.DEPLOY
        self._record.detail = f"{self._record.detail}; {served}" if is_deploy else served
        return Event.ROLLED_BACK

    def _finish(self) -> Event:
        self._watch = None
        shutil.rmtree(self._downloads, ignore_errors=True)
        self._start_idle()
        return Event.DONE

    def _start_idle(self) -> None:
        self._record = _Record(state=self._record.state, acks=self._record.acks)

    # --- helpers ---------------------------------------------------------------------------

    def _ref(self) -> BundleRef:
        command = self._record.command
        if command is None or command.bundle is None:
            raise UpdateError("the saved update state names no bundle")
        return command.bundle

    def _bundle(self) -> str:
        command = self._record.command
        if command is not None and command.bundle is not None:
            return _label(command.bundle)
        return "the rollback" if command else "no bundle"

    def _deploy_slot(self) -> SlotName:
        if self._record.slot is None:
            raise UpdateError("the saved update state names no slot")
        return self._record.slot

    def _target(self) -> TargetFile:
        if self._record.target is None:
            raise UpdateError("the saved update state holds no signed target")
        return TargetFile.from_dict(copy.deepcopy(self._record.target), self._ref().target_path)

    def _client(self) -> OtaClient:
        command = self._record.command
        assert command is not None
        metadata_url = command.metadata_url or self._ota.metadata_url
        targets_url = command.targets_url or self._ota.targets_url
        if not metadata_url or not targets_url:
            raise UpdateError(
                "no TUF repository: the command carries no metadata_url/targets_url and "
                "agent.toml sets no ota.metadata_url/ota.targets_url"
            )
        root = self._metadata_dir / "root.json"
        if not root.exists():
            if self._ota.trusted_root is None:
                raise UpdateError(
                    "no trusted TUF root: set ota.trusted_root in agent.toml to the fleet's "
                    "root.json (enrollment writes it)"
                )
            self._metadata_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(root, self._ota.trusted_root.read_bytes())
        return OtaClient(
            self._metadata_dir,
            metadata_url,
            targets_url=targets_url,
            target_dir=self._downloads,
            http=self._http,
        )

    def _installed_version_number(self) -> int:
        fallback = self._record.fallback
        slot = self._slots.slot(fallback) if fallback else None
        return slot.manifest().version_number if slot and slot.installed else 0

    @staticmethod
    def _check_manifest(manifest: Manifest, target: TargetFile, what: str) -> None:
        signed = bundle_fields(target)
        found = (manifest.name, manifest.version, manifest.version_number)
        wanted = (signed["name"], signed["version"], signed["version_number"])
        if found != wanted:
            raise TrustError(
                f"{what} holds {found[0]} {found[1]} (version_number {found[2]}) but the signed "
                f"target {target.path} is {wanted[0]} {wanted[1]} ({wanted[2]}): refused"
            )

    def _pointer_moved(self) -> bool:
        active = self._slots.active()
        return active is not None and active.name == self._record.slot

    def _serve(self, model: LoadedModel | None) -> None:
        self._serving = model.manifest if model else None
        self._activate(model)

    def _serve_active(self) -> None:
        active = self._slots.active()
        if active is None:
            self._serve(None)
            return
        try:
            model = load_installed(active.path)
        except AgentError as e:
            log.error("the serving slot %s does not load, no model serves: %s", active.name, e)
            self._serve(None)
            return
        self._serve(model)

    # --- persistence and acks --------------------------------------------------------------

    def _load(self) -> _Record:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return _Record()
        try:
            return _Record.model_validate_json(data)
        except ValidationError as e:
            kept = self._path.with_name(f"{STATE_FILE}.unreadable")
            os.replace(self._path, kept)
            log.error(
                "%s is not format-1 updater state (%s); kept as %s. Starting idle with the "
                "model the slot pointer names",
                self._path,
                e.errors()[0]["msg"],
                kept,
            )
            return _Record()

    def _save(self) -> None:
        write_atomic(self._path, self._record.model_dump_json(indent=1).encode())

    def _make_ack(self, command: Command, state: AckState, detail: str) -> Ack:
        bundle = command.bundle and _label(command.bundle)
        if command.kind is CommandKind.ROLLBACK and self._serving is not None:
            bundle = _label(self._serving)
        return Ack(
            command=command.id,
            state=state,
            detail=detail[:2000],
            bundle_version=bundle,
            ts=time.time(),
        )

    def _remember(self, ack: Ack) -> None:
        acks = self._record.acks
        acks.pop(ack.command, None)
        acks[ack.command] = ack
        while len(acks) > _KEPT_ACKS:
            del acks[next(iter(acks))]

    def _reply(self, command: Command, state: AckState, detail: str) -> None:
        """An ack outside the machine (a refusal, a resend): saved, then sent."""
        ack = self._make_ack(command, state, detail)
        self._remember(ack)
        self._save()
        self._ack(ack)
