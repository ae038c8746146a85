"""Configuration: the option table, the config-file schema, and loading (CLI > env > file > default)."""
