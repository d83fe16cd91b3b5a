"""A training run's lifecycle, the same for every task: the folder's lock, the start (resume guard, saved config,
seeds, device), stop signals, checkpoints (keep-K, finite-only, divergence rewind), the tools' resume flags and
exit statuses."""
