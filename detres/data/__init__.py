"""data package of detres."""
