"""Hand-written CPU kernels for the hot paths torch runs slowly here, each with torch's operators as fallback."""
