"""The web dashboard (`durable ui`, or DURABLE_UI=on beside the daemon's probes):
server-rendered pages over the store, live through server-sent events."""
