"""Whether loading a model on one more instance pays off, from what runs have taken so far.

One rule for both dispatchers that keep models where they are (issue 16): the cluster's scheduler
(``cluster_proxy.scheduler``) and the API queue's free watches (``queue_service.affinity``). At the end of
a model's work, the instances holding it may finish the waiting tasks sooner than another instance could
load it: that load is then needless.
"""

from __future__ import annotations


class Costs:
    """What a task and a model load take, as observed (moving averages): whether a load pays off.

    A task that ran where its models already were is a plain run; one that needed a load took
    the load longer. Until both kinds have been seen, a load counts as taking ``UNSEEN_LOAD_RUNS`` plain
    runs: at the start of a burst no run has ended yet, and its first tasks may all want one model (the
    others' tasks arrive a moment later). Counted as worth it then, every free instance loaded that one
    model, and the others' tasks found no instance left (issue 16: 7 loads where 6 do, up to 4 of one
    checkpoint). With the prior, a model some instance holds or is loading is loaded again only once
    that many of its tasks wait per holder; one that none holds is not asked about (it must be loaded).
    An instance holding nothing (just started) is not held back by the prior: a pool that knows nothing
    yet spreads its first tasks as without affinity, and their runs teach it the costs.
    """

    ALPHA = 0.2
    UNSEEN_LOAD_RUNS = 4.0

    def __init__(self) -> None:
        self.run_s: float | None = None
        self.loaded_run_s: float | None = None

    def observe(self, seconds: float, loaded: bool) -> None:
        old = self.loaded_run_s if loaded else self.run_s
        new = seconds if old is None else old + self.ALPHA * (seconds - old)
        if loaded:
            self.loaded_run_s = new
        else:
            self.run_s = new

    def worth_loading(self, waiting_per_holder: float, *, holding: bool = True) -> bool:
        """Another instance loading a model pays off: its holders would take longer over the waiting tasks.
        ``holding``: that instance holds models of its own (False: nothing yet)."""
        if self.run_s is None or self.loaded_run_s is None:
            return not holding or waiting_per_holder >= self.UNSEEN_LOAD_RUNS
        return waiting_per_holder * self.run_s >= max(0.0, self.loaded_run_s - self.run_s)
