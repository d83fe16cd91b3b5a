"""evaluation package of detres."""
