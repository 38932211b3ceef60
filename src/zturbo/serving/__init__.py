"""Serving: the HTTP app, the job queue, worker processes, metrics and the web UI."""
