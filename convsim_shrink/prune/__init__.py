"""Pruning: channel ranking, the search for a measured target, pruning safety and compensation."""
