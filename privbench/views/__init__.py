"""Views over stored rows (``bench leaderboard``, ``bench report``): selection, statistics, metadata.

Nothing here imports the runner: a view reads the store (and, for rows that do not carry it, a
component's declared metadata from the registry) and nothing else.
"""
