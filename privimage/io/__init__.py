"""Files and randomness every stage shares. Each module is a unit of its own:

``atomic`` (the one file writer), ``names`` (class names as folder names), ``artifacts``
(every inter-stage file name, the stage contract, typed save/load), ``stats`` (a stage's
``stats.jsonl``), ``seeding`` (secret DP entropy and seeded public streams) and
``release`` (the release boundary).
"""
