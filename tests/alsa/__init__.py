"""Sound devices for tests on machines without a sound card: see `devices`."""
