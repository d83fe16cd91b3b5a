"""engine package of detres."""
