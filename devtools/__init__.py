"""Development tools of a source checkout, not part of the installed distribution.

``python -m devtools.cluster``: the loopback cluster (Redis, N gateways, nginx with
deploy/nginx/nginx.conf). ``devtools.procs``: the free-port and process-supervision
helpers the cluster, ``bench/run.py`` and the tests share.
"""
