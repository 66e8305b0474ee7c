"""EV_Central: the control centre of the EV charging network."""
