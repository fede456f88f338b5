"""Who is connected where: the Presence seam, in memory and in Redis."""
