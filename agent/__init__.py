"""The on-device agent: inference runtimes, cloud fallback, telemetry queue, A/B updater.

``edgefleet agent run`` starts :mod:`agent.daemon`, which ties the pieces together over one
MQTT connection:

* serving: :mod:`agent.runtimes` (ONNX Runtime, LiteRT, TVM behind one interface),
  :mod:`agent.model` (an installed bundle, loaded), :mod:`agent.inference` (local first,
  then :mod:`agent.fallback`, the cloud behind a circuit breaker) and :mod:`agent.api`
  (the local Open Inference Protocol server);
* updates: :mod:`agent.updater` (the A/B lifecycle as one transition table) over
  :mod:`agent.slots`;
* telemetry: :mod:`agent.telemetry` (records and the sender) over
  :mod:`agent.telemetry_queue` (the offline queue);
* the device itself: :mod:`agent.config` (``agent.toml``), :mod:`agent.enroll`,
  :mod:`agent.install` (a venv, runtime wheels and a systemd unit on a board) and
  :mod:`agent.sd_notify`.

docs/architecture.md places the agent among the other packages; docs/agent.md is its
reference.
"""
