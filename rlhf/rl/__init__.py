"""On-policy RLHF (``rlhf ppo``): the pieces of the job, starting with its reward sources."""
