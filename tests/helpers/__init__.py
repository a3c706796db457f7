"""Helpers the tests share, by what they hold: engine worlds and "wrote nothing" checks
(engine), channel-side commands (channels), REST calls (rest), raw sockets and frames
(realtime), a daemon in process or as a subprocess (daemon), webhook receivers
(webhooks), the Node SDK setup (interop). Fixtures live in tests/conftest.py."""
