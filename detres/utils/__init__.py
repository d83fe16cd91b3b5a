"""utils package of detres: bottom-floor file I/O (atomic writes, strict JSON, checkpoint files)."""
