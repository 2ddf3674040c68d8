"""The recipe: its schema (every key, type, default and meaning), how a file is read, and what a
user is told when it is wrong. Imports nothing of torch or mace, so `mace-mf recipe check` answers
at once."""
