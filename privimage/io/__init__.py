"""Files and randomness every stage shares. Each module is a unit of its own:

``atomic`` (the one file writer), ``artifacts`` (every inter-stage file name and the
stage contract), ``stats`` (a stage's ``stats.jsonl``), ``seeding`` (secret DP entropy and
seeded public streams) and ``release`` (the release boundary).
"""
