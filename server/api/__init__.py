"""One servicer per proto service: proto in, domain call, proto out. No SQL here."""
