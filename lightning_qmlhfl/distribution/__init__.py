"""One simulation over several processes: which rows a rank holds (shard) and the collectives between ranks."""
