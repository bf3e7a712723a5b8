"""What depends on one library's internals, kept apart so that a new torch or oneDNN breaks one file:
amp.py (GradScaler's and fused Adam's private protocol) and cpu_conv.py (a faster oneDNN path for the
CPU's small-side weight gradients)."""
