"""The composed config of a run: the typed schema (schema.py), the checks that types cannot
express (check.py), and composing conf/ with overrides (compose.py)."""
