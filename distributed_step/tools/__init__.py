"""The commands beside `train`: bench (the step), input bench, doctor (preflight), plot; each
is `python -m distributed_step COMMAND`. Built on the core; nothing in the core imports them."""
