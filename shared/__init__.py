"""Code shared by the EV charging network services."""
