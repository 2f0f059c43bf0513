"""Jobs: pulls, packages and scheduled syncs, run the same way in-process or on workers.

Design notes (issue 14). The ``jobs`` row (:mod:`.records`) is the record of a job; the
dispatcher (:mod:`.dispatch`) only decides *who* calls :func:`.tasks.execute`:

* SQLite, one machine: ``aggregator serve`` runs jobs on its own threads. SQLite allows one
  writer at a time and its locks are per machine, so more processes would only queue on it.
* PostgreSQL: Procrastinate (:mod:`.queue`) and ``aggregator worker`` processes, as many as
  needed, on any machine that shares the database and the home. Move there when one process's
  threads are not enough, when pulls must run on several machines, or when the API runs in
  several processes. The task code does not change.

Safety rests on three independent things: the case's pull lock (:mod:`.lock`, freed by the OS
or the database when its holder dies), Procrastinate's ``lock``/``queueing_lock`` per case, and
the job row's lease (a reaped job's old runner cannot write any more).
"""
