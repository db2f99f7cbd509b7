"""The directory's two storage engines, SQLite and PostgreSQL, behind one face.

The directory's SQL is written once, with `$1`-style parameters, in the words both
engines understand; what differs (parameter style, a few column types, the schema
version's home, how another process's change is noticed) is kept per engine here.
"""
