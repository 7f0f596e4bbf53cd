"""dinoforge data curation: ingest -> embed -> dedupe -> cluster -> retrieve -> shard, as resumable Ray jobs."""

__version__ = "0.1.0"
