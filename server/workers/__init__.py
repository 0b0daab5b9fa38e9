"""Background work, every loop of it run by one supervisor (:mod:`.supervisor`: back-off
on failure, metrics per loop, shutdown in order). Each module gives the loops of its work
as :class:`~.supervisor.Loop` specs around one-step functions: ``monitors`` (health, load),
``events`` (the Redis bus reader), ``purge``, ``tunnels`` (agent sweep, endpoint prober),
``webhooks`` (claims, records, header sealing), ``operations``, ``aggregates`` (the
violation log's and the call outcomes' flushes), ``usage`` (the roll-up), ``notifications``
(the evaluator of critical conditions)."""
