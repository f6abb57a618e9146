"""``fama eval tau2``: a live A/B of supervision on tau2-bench's environments, a client of the proxy like
``fama bench``. The same tasks, trials and seeds run ``direct`` against the model server and through ``fama serve`` in
``observe`` and ``enforce`` mode (started here as processes, or a running proxy at ``--proxy-url``); tau2's own
evaluator scores each episode, every supervised session reports its outcome to the proxy, and the report counts per
trial pair what supervision rescued and what it broke, with the Intervention Paradox rule p > d/(r+d).

Only ``tau2_env`` imports ``tau2`` (the optional ``eval`` extra); nothing here imports the proxy's internals.
"""
