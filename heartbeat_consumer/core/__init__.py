"""The pure core: heartbeat.json models and formats, the scheduling rules, state and
its transitions, bus envelopes and names, time. No clock reads, no I/O beyond reading
a config file, no broker libraries; imports nothing of the other layers."""
