"""Ray Serve services: the trained policy behind an OpenAI-compatible API (:mod:`cai_ray.serving.policy`).

Serve's HTTP proxy checks no credentials, so every service binds to 127.0.0.1 unless configured otherwise and
checks a bearer token itself when one is configured (:mod:`cai_ray.serving.auth`); :mod:`cai_ray.serving.service`
starts Serve's proxy and runs an application on it.
"""
