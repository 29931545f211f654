"""Model families; one file each (perco_sd now)."""
