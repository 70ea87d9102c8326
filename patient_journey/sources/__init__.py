"""Source adapters: extract = I/O into bronze records with lineage; bad records become rejects."""
