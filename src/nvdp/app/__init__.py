"""The plugin's composition and supervision: discovery, health monitoring, serving, reload, stop."""
