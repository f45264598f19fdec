"""The wire contract: DHT keys, typed records and RPC messages. No training logic lives here."""
