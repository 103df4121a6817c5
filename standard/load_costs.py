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
    the load longer. Until both kinds have been seen, every load counts as worth it.
    """

    ALPHA = 0.2

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

    def worth_loading(self, waiting_per_holder: float) -> bool:
        """Another instance loading a model pays off: its holders would take longer over the waiting tasks."""
        if self.run_s is None or self.loaded_run_s is None:
            return True
        return waiting_per_holder * self.run_s >= max(0.0, self.loaded_run_s - self.run_s)
