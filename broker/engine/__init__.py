"""The storage engine: schema, the writer actor, the reader pool, commands and queries.

Every write is a command applied by the one `WriterActor`; every read is a
function run on the `ReaderPool`. Nothing above this package touches SQL.
"""
