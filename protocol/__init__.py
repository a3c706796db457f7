"""Wire types of the broker: msgspec Structs, codecs and validation.

Sans-IO by design (like h11 and wsproto): nothing in this package opens a
socket, touches the database or imports trio, so every frame can be tested
without a server.
"""
