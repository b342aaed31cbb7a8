"""What the `moejax lab` and `moejax trace` commands run: the policy lab and the tracer."""
