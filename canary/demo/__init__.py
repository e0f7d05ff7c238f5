"""A real local playground: two versions of a small service behind nginx, scraped by
Prometheus, all on loopback. `canary demo` and the end-to-end tests both use it."""
