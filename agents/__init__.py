"""Model endpoints, metered calls, and the manager and worker agents."""
