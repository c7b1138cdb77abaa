"""Ctrl+C and SIGTERM during `genflow train`: stop, keep the latest checkpoint, say how to resume.

Ray Train V2's own SIGINT handler aborts its controller at once. The controller learns of a
checkpoint only when it next polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
2 s by default), and a checkpoint it has not registered is not resumed from: a Ctrl+C right
after a checkpoint lost it, and the rerun started again from step 0. `fit_stoppably` takes
that handler's place (for SIGTERM too, where Ray's would kill the process): it waits two poll
intervals, so that the controller registers what the workers reported, then aborts the run
as Ray's handler does. `CheckpointLedger` records, from the controller, the step of every
checkpoint Ray registered: the step a rerun resumes from.
"""

from __future__ import annotations

import os
import warnings
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import ray
from ray.train import UserCallback

CHECKPOINT_STEP_TAG = "genflow.checkpoint_step"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl+C or SIGTERM; the message says where and how to resume."""


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """A SIGTERM (what a cluster, `timeout` or `kill` send) is handled like Ctrl+C: the same
    cleanup runs (temporary folders removed, runs marked KILLED) instead of an abrupt exit."""
    with _handlers({signal.SIGTERM: _raise_keyboard_interrupt}):
        yield


@contextmanager
def _handlers(handlers: dict) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python (Ray's SIGTERM handler), not ours to restore
                signal.signal(sig, handler)


def registration_grace_s() -> float:
    """How long the controller may take to register a checkpoint the workers reported: two
    polls, as a report that lands just after one poll is taken by the next."""
    return 2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.0


class _GracefulStop:
    def __init__(self, grace_s: float):
        self.grace_s, self.controller, self.requested, self.aborted = grace_s, None, None, False

    def take_over(self, controller) -> None:
        """Called by fit() where Ray would register its SIGINT handler."""
        self.controller = controller

    def handle(self, signum, frame) -> None:
        first = self.requested is None
        self.requested = signal.Signals(signum).name
        if self.controller is None:  # before Ray Train started: nothing to keep
            raise KeyboardInterrupt(self.requested)
        if first:
            print(f"genflow: {self.requested}: stopping; keeping the latest checkpoint ({self.grace_s:.0f} s; "
                  "press Ctrl+C again to stop at once)", file=sys.stderr, flush=True)
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline and not self.aborted:
                time.sleep(0.1)  # a second signal runs this handler again, nested, and aborts
        if not self.aborted:
            self.aborted = True
            try:
                ray.get(self.controller.abort.remote())
            except ray.exceptions.RayActorError:
                pass  # the abort ends the controller's process


def ray_version() -> str:
    import ray

    return ray.__version__


def fit_stoppably(trainer, grace_s: float | None = None):
    """trainer.fit(); on SIGINT or SIGTERM, let Ray register the latest checkpoint, abort the
    run and raise KeyboardInterrupt."""
    stop = _GracefulStop(registration_grace_s() if grace_s is None else grace_s)
    # The one place Ray Train V2 (2.60) hands its controller to the driver (main thread only).
    # A Ray that no longer has it would leave Ctrl+C without its grace period: say so loudly.
    if not hasattr(type(trainer), "_register_sigint_handler"):
        raise RuntimeError(f"{type(trainer).__name__} has no _register_sigint_handler (Ray {ray_version()}): "
                           "genflow's Ctrl+C handling needs Ray 2.60's Train V2 controller hand-over")
    trainer._register_sigint_handler = stop.take_over
    with _handlers({sig: stop.handle for sig in _STOP_SIGNALS}):
        try:
            return trainer.fit()
        except Exception:
            if stop.requested:  # the abort ends fit() with the controller's death
                raise KeyboardInterrupt(stop.requested) from None
            raise


class CheckpointLedger(UserCallback):
    """Runs in Ray Train's controller: after Ray registered a checkpoint, tag the MLflow run
    with its step (the step a rerun resumes from)."""

    def __init__(self, tracking_uri: str, run_id: str, env: dict[str, str]):
        self.tracking_uri, self.run_id, self.env = tracking_uri, run_id, env

    def __setstate__(self, state: dict) -> None:
        # Unpickled when the controller starts: import MLflow (seconds) now, not in the short
        # wait after an interrupt, when the tag must be written promptly.
        self.__dict__.update(state)
        os.environ.update(self.env)  # which tracking store, as the workers have it (no credential values)
        from mlflow import MlflowClient

        self.client = MlflowClient(self.tracking_uri)

    def __getstate__(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "env": self.env}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None or "step" not in metrics[0]:
            return
        from genflow.track.mlflow import with_retries

        step = int(metrics[0]["step"])
        try:
            with_retries(lambda: self.client.set_tag(self.run_id, CHECKPOINT_STEP_TAG, str(step)))
        except Exception as err:  # noqa: BLE001
            # The tag is only a record for the interrupt message (Ray holds the checkpoint). An
            # exception here would end the run as a ControllerError, which max_failures never
            # retries: a tracking-store blip must not cost a long run.
            warnings.warn(f"could not record checkpoint step {step} on MLflow run {self.run_id}: {err}", stacklevel=1)


def interrupted_message(family: str, run_tags: dict[str, str], max_steps: int) -> str:
    step = run_tags.get(CHECKPOINT_STEP_TAG)
    if step is None:
        return f"{family}: interrupted before the first checkpoint; run the same command to start again"
    return f"{family}: interrupted; last checkpoint at step {step} of {max_steps}; run the same command to resume from there"
