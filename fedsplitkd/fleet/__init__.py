"""The fleet: device profiles, the delay/energy cost model, clustering and the adaptive cut."""
