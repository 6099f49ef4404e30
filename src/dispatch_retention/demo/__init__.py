"""The demo: the whole cycle on an embedded PostgreSQL (`cycle`) and its sample data, the
CREATE TABLE of the Dispatch model and synthetic rows (`synthetic`, also used by the bench).
"""
