"""Conversations on the generation layer: the prompt split, the session, its backends, the REPL and commands."""
