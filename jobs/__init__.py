"""RQ side of the loader: task functions, enqueueing, and the worker entry point."""
