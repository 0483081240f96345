"""The task file: its schema and validation, the registry of tasks under $VPT_HOME, locks."""
