"""A fleet simulator: thousands of charging points and drivers against a real Central."""
