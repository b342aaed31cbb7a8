"""Serving many requests: the request contract, scheduling policies, the serving loop and front ends."""
