"""The DHT entry point of a run; it publishes the run spec."""
