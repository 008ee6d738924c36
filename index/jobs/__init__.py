"""Batch jobs over the store and the index: the rebuild cron entry and duplicate-product scans.

``rebuild``: catalog diff -> store -> new index version -> validate -> publish -> notify -> GC.
``dedup``: k-NN self-join of the stored vectors against the live index -> near-duplicate groups.
``distributed``: the same jobs on a Ray cluster (``--distributed ray[:ADDRESS]``); ``ray`` is
imported only there.
"""
