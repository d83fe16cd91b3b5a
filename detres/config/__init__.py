"""config package of detres."""
