"""Measuring models: forward-pass latency (the target search's meter, the report's speed rows)."""
