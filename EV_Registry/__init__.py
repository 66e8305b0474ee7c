"""EV_Registry: charging points registered, deregistered and enrolled over a REST API."""
