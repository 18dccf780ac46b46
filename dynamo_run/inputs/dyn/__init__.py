"""in=dyn://ns.component.endpoint: serve an engine as a worker on the request plane."""
