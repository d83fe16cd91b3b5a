"""inference package of detres."""
