"""The simulated backend: nodes described by YAML profiles, fault injection, its control socket."""
