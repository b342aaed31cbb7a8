"""What experts sequences use: activation matrices and their collection, routing traces, usage estimates,
and the prefetchers that predict the experts ahead."""
