"""One run's life, the same for every command that writes a run folder (pretraining, evaluation).

::

    with Lifecycle(cfg.verbose, main, out_of_memory=...) as life:   # messages held until the folder exists
        ...                                                         # read inputs; bad input fails here
        life.begin(RunDir.create(...), cfg, environment)            # log.txt, config, env, trackers, "running"
        ...                                                         # the work
        life.end("finished", (results, step, "summary.json"))       # trackers' results, the final status

Whatever stops the work between ``begin`` and ``end`` is recorded the same way: ``interrupted`` for a signal,
``failed`` with the error otherwise, an allocation that failed for want of memory turned into the command's one-line
advice first (``out_of_memory``). The run folder is closed in every case (heartbeat, trackers, lock).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from . import config as config_lib
from . import messages
from .errors import UserError
from .rundir import RunDir

log = logging.getLogger(__name__)


class Lifecycle:
    """The context of one job (see the module's docstring). ``at_failure()``: status fields to record with a failure
    (pretraining: the step reached); ``out_of_memory()``: the :class:`UserError` that replaces an out-of-memory
    error."""

    def __init__(self, verbose: bool, main: bool = True,
                 out_of_memory: Optional[Callable[[], UserError]] = None,
                 at_failure: Callable[[], dict] = dict):
        self.verbose, self.main = verbose, main
        self.out_of_memory, self.at_failure = out_of_memory, at_failure
        self.run: Optional[RunDir] = None
        self._messages, self.run_log = None, None  # until entered: the messages go as they would without a job

    def __enter__(self) -> "Lifecycle":
        self._messages = messages.job(self.verbose, self.main)
        self.run_log = self._messages.__enter__()
        return self

    def set_main(self, main: bool) -> None:
        """Whether this is the main process (known once the process group starts): the others print nothing."""
        self.main = main
        if self.run_log is not None:
            self.run_log.set_main(main)

    def begin(self, run: RunDir, cfg, environment: dict, **status) -> None:
        """The run folder exists: the held messages go into its log.txt; its config, environment and trackers are
        written; its status says ``running`` (with ``status``)."""
        self.run = run
        if self.run_log is not None:
            self.run_log.attach(run.path)
        config_lib.save(cfg, run.path / "config.yaml", run_dir="")  # its location is its identity: not recorded
        run.record_environment(environment)
        run.track(cfg.logger, config_lib.to_dict(cfg), cfg.name, cfg.mlflow_uri)
        if run.trackers.live:
            log.info(f"trackers: {run.trackers.describe()}")
        run.set_status("running", **status)

    def end(self, status: str, results: Optional[tuple] = None, **fields) -> None:
        """The work is over (``finished``, or ``interrupted`` with its state saved): the trackers get ``results``,
        ``(numbers, step, name of the file that holds them)``, and the status says ``status`` (with ``fields``)."""
        if self.run is not None:
            if results is not None:
                self.run.trackers.results(*results)
            self.run.set_status(status, **fields)

    def __exit__(self, kind, error, tb) -> bool:
        raised = error
        try:
            if error is not None:
                from .runtime import out_of_memory  # torch: not for a job that never started
                if self.out_of_memory is not None and out_of_memory(error):
                    error = self.out_of_memory()
                if self.run is not None:
                    status = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
                    try:  # SystemExit: a second signal exits without saving
                        self.run.set_status(status, error=f"{type(error).__name__}: {error}", **self.at_failure())
                    except (OSError, UserError):
                        pass
        finally:
            if self.run is not None:
                self.run.close()  # the heartbeat stops, the trackers finish, the run folder's lock is released
            self._messages.__exit__(None, None, None)
        if error is not raised:
            raise error from None
        return False
