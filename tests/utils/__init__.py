"""Real servers for tests: an HTTP file server with Range support and a TCP proxy that cuts."""
