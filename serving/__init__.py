"""Ray Serve applications hosting vLLM replicas: production inference and RLHF rollouts."""
