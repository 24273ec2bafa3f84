"""Choosing workers: filters drop candidates, scorers rate them in [0, 1], a weighted sum ranks
them, a picker takes one. Prefill and decode are two profiles of the same machinery."""
