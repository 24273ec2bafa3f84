"""The P:D pool planner: sizes the prefill and decode pools from the gateways' serving signals
(signals.py, scrape.py), with a policy that follows load without flapping (policy.py,
damping.py), and applies its recommendation through an adapter: a dry run, Kubernetes
Deployments or the Ray pools (adapters.py, kubernetes.py, ray_actor.py), every interval
(loop.py). `kvrelay plan` runs it."""
