"""structures package of detres."""
