"""Recovery math and decisions as pure functions: shared by the live swarm and the churn benchmark."""
