"""models package of detres."""
