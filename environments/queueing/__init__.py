"""The serving environment: a discrete-event simulation of the server's scheduler (arrivals, a bounded
queue, continuous batching, per-step actions) driven by a measured step-time table (action x batch size x
context) and the outcome cache's quality, and the non-learned serving policies (dense, static, slack, rule)."""
