"""Ray plumbing: connecting to or starting a cluster, and the resources of each job."""
