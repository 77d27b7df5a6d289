"""The HTTP layer: validates, enqueues and streams; never touches tensors."""
